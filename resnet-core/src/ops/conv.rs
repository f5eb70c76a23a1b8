//! 2-D convolution on the CPU as one op with both backward passes: im2col + GEMM (the `gemm` crate that
//! candle itself uses) with reused per-thread buffers, threaded over the images of the batch. 3×3 stride-1
//! layers go to faster kernels where they apply: Winograd F(2×2, 3×3) for wide layers (`winograd`); with AVX2
//! or AVX-512 the forward pass of the other layers wider than 1×1, the input gradient of the 3×3 stride-1 ones
//! and the weight gradient of every 3×3 one to the channel-blocked kernels (`ops::blocked`).
//! [`Algorithm::choose`] decides, per shape and pass, for the kernel set in use ([`Isa::current`]).
//!
//! A rank-5 input `[N, C/B, H, W, B]` is channel-blocked (`ops::channel_blocks`): the blocked kernels read it
//! and write the output and the input gradient in that layout, without converting (see
//! [`Conv2dOp::runs_blocked`]).
//!
//! Why: candle 0.11's CPU convolution copies its im2col layout on one thread, computes the input gradient
//! with a direct `conv_transpose2d` loop and the weight gradient as a convolution with an image-sized kernel;
//! a ResNet-20 training step ran at 12.8 img/s through it.
//!
//! Per image n, with K = C_in·k_h·k_w and P = H_out·W_out:
//!   forward       Y_n[C_out, P] = W[C_out, K] · col(X_n)[K, P]
//!   input grad    dX_n = col⁻¹(Wᵀ · dY_n)                (col⁻¹ scatters back: the adjoint of im2col)
//!   weight grad   dW = Σ_n dY_n · col(X_n)ᵀ              (summed in a fixed order: deterministic; computed
//!                                                          as dWᵀ = Σ_n col(X_n) · dY_nᵀ for few channels)

use crate::ops::blocked::{self, Blocked, BlockedConv, BlockedSlice, OutputLayout, Source};
use crate::ops::channel_blocks::from_blocked;
use crate::ops::cpu_slice::{contiguous_f32, each_chunk, kept_prefix, written_by, zeroed};
use crate::ops::gemm::matmul;
use crate::ops::isa::Isa;
use crate::ops::parallel::for_each_chunk;
use crate::ops::strided_pointwise::StridedPointwise;
use crate::ops::winograd;
use crate::ops::zero_pad_shortcut::subsampling_adjoint;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use std::cell::{Cell, RefCell};
use std::mem::MaybeUninit;
use std::sync::Mutex;

/// Output channels up to which the weight gradient is computed transposed (see `weight_grad`).
const TRANSPOSED_WEIGHT_GRAD_MAX_CHANNELS: usize = 128;

/// Images per weight-gradient partial sum: a fixed grouping, so the sum does not depend on the thread count.
const WEIGHT_GRAD_GROUP: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dOp {
    pub stride: usize,
    pub padding: usize,
}

/// One of the three computations of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pass {
    Forward,
    InputGrad,
    WeightGrad,
}

impl Pass {
    pub const ALL: [Pass; 3] = [Pass::Forward, Pass::InputGrad, Pass::WeightGrad];
}

/// How a pass of a convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Algorithm {
    /// Column matrix of the image, then a GEMM with the weights.
    Im2colGemm,
    /// 1×1 stride 1: the image is its own column matrix, a GEMM alone.
    PointwiseGemm,
    /// Winograd F(2×2, 3×3): transforms and 16 GEMMs (`winograd`).
    Winograd,
    /// The channel-blocked kernel of inference (`ops::blocked`), the layout converted on the way in and out.
    Blocked,
    /// 1×1 of stride > 1, forward and input gradient: each image subsampled, then register-tiled products
    /// (`ops::strided_pointwise`).
    StridedPointwise,
}

impl Algorithm {
    /// The algorithm for `pass` of the convolution of `x` (`[N, C_in, H, W]`) with `w` (`[C_out, C_in, k, k]`)
    /// on kernel set `isa`: the one place where shapes meet algorithms.
    pub fn choose(op: &Conv2dOp, x: &Shape, w: &Shape, pass: Pass, isa: Isa) -> Result<Algorithm> {
        Ok(Geometry::new(x, w, op)?.algorithm(pass, isa))
    }
}

thread_local! {
    /// The last algorithm each pass ran on this thread (the op's caller), for tests and `bench --convs`.
    static LAST: [Cell<Option<Algorithm>>; 3] = const { [const { Cell::new(None) }; 3] };
}

/// The algorithm that `pass` of the last convolution called from this thread ran.
pub fn last_algorithm(pass: Pass) -> Option<Algorithm> {
    LAST.with(|l| l[pass as usize].get())
}

fn ran(pass: Pass, algorithm: Algorithm) {
    LAST.with(|l| l[pass as usize].set(Some(algorithm)));
}

/// Output columns `lo..hi` of one output row, reading the input from `start` every `step` elements.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    lo: usize,
    hi: usize,
    step: usize,
}

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    /// `Some(B)` for a channel-blocked training tensor `[N, C/B, H, W, B]` (see [`Conv2dOp`]).
    lanes: Option<usize>,
}

impl Geometry {
    fn new(x: &Shape, w: &Shape, op: &Conv2dOp) -> Result<Self> {
        let (n, c_in, h, wd, lanes) = match *x.dims() {
            [n, blocks, h, w, lanes] => (n, blocks * lanes, h, w, Some(lanes)),
            _ => {
                let (n, c, h, w) = x.dims4()?;
                (n, c, h, w, None)
            }
        };
        let (c_out, c_in_w, kh, kw) = w.dims4()?;
        if c_in != c_in_w {
            candle_core::bail!("conv2d: input has {c_in} channels, weight {w:?} expects {c_in_w}");
        }
        if h + 2 * op.padding < kh || wd + 2 * op.padding < kw || op.stride == 0 {
            candle_core::bail!(
                "conv2d: input {x:?} too small for kernel {kh}×{kw} (padding {})",
                op.padding
            );
        }
        Ok(Self {
            n,
            c_in,
            h,
            w: wd,
            c_out,
            kh,
            kw,
            stride: op.stride,
            pad: op.padding,
            oh: (h + 2 * op.padding - kh) / op.stride + 1,
            ow: (wd + 2 * op.padding - kw) / op.stride + 1,
            lanes,
        })
    }

    /// The output's shape: `[N, C_out, H', W']`, or `[N, C_out/B, H', W', B]` for a blocked input.
    fn out_shape(&self) -> Shape {
        match self.lanes {
            Some(b) => Shape::from((self.n, self.c_out / b, self.oh, self.ow, b)),
            None => Shape::from((self.n, self.c_out, self.oh, self.ow)),
        }
    }

    /// Whether all three passes run on blocked tensors with kernel set `isa` (see [`Conv2dOp`]): the blocked
    /// kernels compute the forward and the weight gradient, and the input gradient of a stride-1 layer.
    fn trains_blocked(&self, isa: Isa) -> bool {
        self.trains_blocked_pointwise(isa)
            || (self.c_in.is_multiple_of(blocked::lanes(isa))
                && self.writes_blocks(isa)
                && (self.stride > 1 || self.blocked_applies(Pass::InputGrad, isa)))
    }

    /// A 1×1 convolution without padding (the projection shortcuts, the bottleneck's 1×1 layers) on blocked
    /// tensors with AVX2 or AVX-512, channels in whole blocks: its forward by the blocked kernel, its input
    /// gradient the blocked kernel's 1×1 convolution of `dy` with Wᵀ (spread to every `stride`-th pixel), its
    /// weight gradient the blocked weight-gradient tiles (`blocked::weight_grad`, its 1×1 tiles), both
    /// operands read in place.
    fn trains_blocked_pointwise(&self, isa: Isa) -> bool {
        let lanes = blocked::lanes(isa);
        matches!(isa, Isa::Avx2 | Isa::Avx512)
            && (self.kh, self.kw, self.pad) == (1, 1, 0)
            && self.c_in.is_multiple_of(lanes)
            && self.c_out.is_multiple_of(lanes)
    }

    /// Whether the blocked kernels of `isa` compute the forward and the weight gradient: what a convolution of
    /// an NCHW input needs to write its output in blocks ([`Conv2dOp::forward_into_blocks`]).
    fn writes_blocks(&self, isa: Isa) -> bool {
        self.blocked_applies(Pass::Forward, isa) && self.blocked_applies(Pass::WeightGrad, isa)
    }

    /// The kernel set that computes this blocked convolution, or an error naming why none does.
    fn blocked_isa(&self) -> Result<(Isa, usize)> {
        let isa = Isa::current();
        match self.lanes {
            Some(b) if b == blocked::lanes(isa) && self.trains_blocked(isa) => Ok((isa, b)),
            lanes => candle_core::bail!(
                "conv2d: a channel-blocked input (blocks of {lanes:?}) for a {}×{} stride-{} convolution from {} \
                 to {} channels, which the {isa} kernel set does not train blocked (it needs blocks of {}, \
                 a 3×3 kernel and whole blocks of channels)",
                self.kh,
                self.kw,
                self.stride,
                self.c_in,
                self.c_out,
                blocked::lanes(isa)
            ),
        }
    }

    /// `data`, `(n, c, h, w)`, as blocked in `lanes`.
    fn blocked<'a>(
        data: &'a [f32],
        dims: (usize, usize, usize, usize),
        lanes: usize,
    ) -> Result<Source<'a>> {
        Ok(Source::Blocked(BlockedSlice::new(data, dims, lanes)?))
    }

    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    fn p(&self) -> usize {
        self.oh * self.ow
    }

    fn image_in(&self) -> usize {
        self.c_in * self.h * self.w
    }

    fn image_out(&self) -> usize {
        self.c_out * self.p()
    }

    /// 3×3, stride 1, padding 1: output the size of the input.
    fn is_3x3_same(&self) -> bool {
        self.kh == 3 && self.kw == 3 && self.stride == 1 && self.pad == 1
    }

    /// See [`Algorithm::choose`]. The input gradient is itself a 3×3 convolution, from C_out to C_in channels.
    fn algorithm(&self, pass: Pass, isa: Isa) -> Algorithm {
        if self.lanes.is_some() && self.trains_blocked_pointwise(isa) {
            return Algorithm::Blocked;
        }
        let plane = (self.h, self.w);
        let (inp, out) = match pass {
            Pass::InputGrad => (self.c_out, self.c_in),
            _ => (self.c_in, self.c_out),
        };
        let winograd = self.is_3x3_same()
            && match (pass, self.lanes) {
                (Pass::WeightGrad, _) => winograd::weight_grad_applies(self.n, (inp, out), plane),
                // On blocked tensors, the blocked forward's own rule (`BlockedConv::algorithm`).
                (_, Some(_)) => winograd::blocked_applies(self.n, (inp, out), plane),
                _ => winograd::applies(self.n, (inp, out), plane),
            };
        // The projections' own kernels where they apply (`StridedPointwise::applies`; no weight gradient).
        if self.lanes.is_none()
            && self.is_strided_pointwise()
            && pass != Pass::WeightGrad
            && self
                .strided_pointwise()
                .applies(isa, pass == Pass::InputGrad)
        {
            return Algorithm::StridedPointwise;
        }
        // With AVX2 and AVX-512 the blocked kernel, converting the layout on the way, takes the layers no
        // Winograd kernel does (see `blocked_applies`).
        match (
            winograd,
            self.blocked_applies(pass, isa),
            self.is_pointwise(),
        ) {
            (true, _, _) => Algorithm::Winograd,
            (false, true, _) => Algorithm::Blocked,
            (false, false, true) => Algorithm::PointwiseGemm,
            (false, false, false) => Algorithm::Im2colGemm,
        }
    }

    /// Whether the blocked kernel computes `pass`: with AVX2 or AVX-512, a square kernel wider than 1×1 with
    /// output channels in whole blocks (for the input gradient, a 3×3 stride-1 layer: it is then a convolution
    /// too; or a 3×3 stride-2 one on a plane wide enough, by its sub-pixel classes, see
    /// `blocked::strided_input_grad_applies`; for the weight gradient, a 3×3 layer of either stride or the 7×7
    /// stem, see `blocked::weight_grad`).
    ///
    /// With AVX2 it runs ResNet-20's 3×3 stride-1 layers, the conversions included, at 1.2–1.4× the speed of an
    /// NCHW direct kernel for AVX2, and the strided ones and ResNet-18's 7×7 stem faster than im2col + GEMM
    /// (`bench --convs`, AMD EPYC Zen 4). The blocked weight gradient took ResNet-20's weight gradients from
    /// 174–210 to 147–160 ms per batch of 128 (AMD EPYC Zen 2, alternated runs), the training step from 281–316
    /// to 318–350 img/s. With AVX-512, once blocks of 16 converted by 8×8 transposes too, it beat an NCHW direct
    /// kernel for AVX-512 and im2col + GEMM in nearly every pass of ResNet-20 and ResNet-18 (64→64 on 56×56:
    /// 184–190 GFLOP/s against 92–93 in each pass), and the training steps ran 403–443 → 455–480 img/s
    /// (ResNet-20, b128) and 9.9–13.3 → 13.1–15.3 (ResNet-18, b16; AMD EPYC Zen 4, alternated runs). Both
    /// direct kernels were removed.
    fn blocked_applies(&self, pass: Pass, isa: Isa) -> bool {
        matches!(isa, Isa::Avx2 | Isa::Avx512)
            && self.kh == self.kw
            && self.kh > 1
            && match pass {
                Pass::Forward => BlockedConv::applies(isa, self.c_out),
                Pass::InputGrad => {
                    (self.kh, self.pad) == (3, 1)
                        && match self.stride {
                            1 => BlockedConv::applies(isa, self.c_in),
                            s => blocked::strided_input_grad_applies(isa, s, self.c_in, self.w),
                        }
                }
                Pass::WeightGrad => {
                    blocked::weight_grad_applies(isa, (self.kh, self.pad), self.c_in, self.c_out)
                }
            }
    }

    /// Chooses the algorithm of `pass` for the kernel set in use, and records it as this thread's last.
    fn dispatch(&self, pass: Pass) -> (Algorithm, Isa) {
        let isa = Isa::current();
        let algorithm = self.algorithm(pass, isa);
        ran(pass, algorithm);
        (algorithm, isa)
    }

    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        (self.n, self.c_in, self.c_out, self.h, self.w)
    }

    /// The output (gradient)'s `(n, c, h, w)`.
    fn dy_dims(&self) -> (usize, usize, usize, usize) {
        (self.n, self.c_out, self.oh, self.ow)
    }

    /// The input `x` as the blocked kernels read it: channel-blocked where this convolution's input is, else NCHW.
    fn input_source<'a>(&self, x: &'a [f32]) -> Result<Source<'a>> {
        let dims = (self.n, self.c_in, self.h, self.w);
        match self.lanes {
            Some(lanes) => Geometry::blocked(x, dims, lanes),
            None => Ok(Source::nchw(x, dims)),
        }
    }

    /// The blocked kernel's weight gradient from the input `x` (in this convolution's layout) and the output
    /// gradient `dy`.
    fn blocked_weight_grad(&self, isa: Isa, x: &[f32], dy: Source) -> Result<Vec<f32>> {
        blocked::weight_grad(
            isa,
            self.input_source(x)?,
            dy,
            (self.c_out, self.oh, self.ow),
            (self.kh, self.stride),
            WEIGHT_GRAD_GROUP,
        )
    }

    /// 1×1, stride 1, no padding: the image itself is its column matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// 1×1, a larger stride, no padding (the ImageNet nets' projection shortcuts): each input pixel receives at
    /// most one output pixel's gradient.
    fn is_strided_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride > 1 && self.pad == 0
    }

    fn strided_pointwise(&self) -> StridedPointwise {
        StridedPointwise {
            n: self.n,
            c_in: self.c_in,
            c_out: self.c_out,
            h: self.h,
            w: self.w,
            stride: self.stride,
        }
    }

    /// The input gradient of a [`Geometry::is_strided_pointwise`] layer: per image Wᵀ · dY into the thread's
    /// column buffer, then every value of the image's dx written once, row by row (the gradient every `stride`
    /// pixels of every `stride`-th row, zeros between). Clearing dx first and adding the columns into it
    /// (col2im) went over dx three times: ResNet-18's 64→128 on 56×56 at batch 16 ran at 36–46 % of peak.
    /// `isa`: the kernel set of [`Algorithm::StridedPointwise`]'s products, or `None` for the gemm crate's.
    fn strided_pointwise_input_grad(&self, dy: &[f32], w: &[f32], isa: Option<Isa>) -> Vec<f32> {
        let (k, p, s) = (self.k(), self.p(), self.stride);
        let wt = isa.map(|_| self.strided_pointwise().transposed_weights(w));
        let isa = isa.zip(wt.as_deref());
        let image = |i: usize, dxi: &mut [MaybeUninit<f32>], inner: Parallelism| {
            let dyi = &dy[i * self.image_out()..(i + 1) * self.image_out()];
            with_columns(k * p, |dcol| {
                match isa {
                    Some((isa, wt)) => self.strided_pointwise().input_columns(isa, dy, wt, i, dcol),
                    // Wᵀ: element (k, c_out) of W[c_out, K] sits at c_out·K + k.
                    None => matmul(
                        (k, p, self.c_out),
                        dcol,
                        false,
                        w,
                        (1, k),
                        dyi,
                        (p, 1),
                        inner,
                    ),
                }
                for (plane, cols) in dxi
                    .chunks_exact_mut(self.h * self.w)
                    .zip(dcol.chunks_exact(p))
                {
                    for (y, row) in plane.chunks_exact_mut(self.w).enumerate() {
                        if y % s != 0 {
                            row.iter_mut().for_each(|v| {
                                v.write(0.0);
                            });
                            continue;
                        }
                        let src = &cols[y / s * self.ow..][..self.ow];
                        spread(src, row, s);
                    }
                }
            })
        };
        let fill = |dx: &mut [MaybeUninit<f32>]| per_image(dx, self.image_in(), self.n, image);
        // SAFETY: every row of every plane of every image is written whole (`w` columns in groups of `stride`,
        // one per output column: ow = ⌈w / stride⌉).
        unsafe { written_by(self.n * self.image_in(), fill) }
    }

    /// Calls `f(row, oy, span)` for every output row `oy` of every column-matrix row, where `span` is
    /// `Some(Span)`: output columns `lo..hi` read the input from `start` in steps of `step` (the others fall in
    /// the padding), or `None` when the whole output row falls in the padding.
    #[inline]
    fn for_each_span(&self, mut f: impl FnMut(usize, usize, Option<Span>)) {
        let (s, pad) = (self.stride, self.pad as isize);
        for ci in 0..self.c_in {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = (ci * self.kh + ky) * self.kw + kx;
                    // Output columns whose input column ix = ox·s + kx − pad lies inside [0, w).
                    let lo = ((pad - kx as isize).max(0) as usize).div_ceil(s);
                    let hi = ((self.w as isize + pad - kx as isize - 1).div_euclid(s as isize) + 1)
                        .clamp(0, self.ow as isize) as usize;
                    for oy in 0..self.oh {
                        let iy = (oy * s + ky) as isize - pad;
                        if iy < 0 || iy >= self.h as isize || lo >= hi {
                            f(row, oy, None);
                            continue;
                        }
                        let ix0 = (lo * s + kx) as isize - pad;
                        let start = ci * self.h * self.w + iy as usize * self.w + ix0 as usize;
                        f(
                            row,
                            oy,
                            Some(Span {
                                start,
                                lo,
                                hi,
                                step: s,
                            }),
                        );
                    }
                }
            }
        }
    }

    /// col[K, P] of one image (zeros where the window is outside the image). Every element is written
    /// once: no separate clearing pass.
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let (p, ow) = (self.p(), self.ow);
        self.for_each_span(|row, oy, span| {
            let out = &mut col[row * p + oy * ow..row * p + (oy + 1) * ow];
            let Some(span) = span else {
                return out.fill(0.0);
            };
            out[..span.lo].fill(0.0);
            out[span.hi..].fill(0.0);
            let dst = &mut out[span.lo..span.hi];
            if span.step == 1 {
                dst.copy_from_slice(&x[span.start..span.start + dst.len()]);
            } else {
                dst.iter_mut()
                    .enumerate()
                    .for_each(|(i, d)| *d = x[span.start + i * span.step]);
            }
        });
    }

    /// `im2col` with all threads, by blocks of input channels (the rows of channel c depend on x[c] only).
    /// For batch 1, whose GEMM is split over threads too: a serial im2col held the 3×3 layers of ResNet-50
    /// to ~95 GFLOP/s.
    fn im2col_parallel(&self, x: &[f32], col: &mut [f32]) {
        let channels = self.c_in.div_ceil(4 * rayon::current_num_threads());
        let plane = self.h * self.w;
        for_each_chunk(col, channels * self.kh * self.kw * self.p(), |i, col| {
            let x = &x[i * channels * plane..];
            let x = &x[..(channels * plane).min(x.len())];
            let block = Geometry {
                c_in: x.len() / plane,
                ..*self
            };
            block.im2col(x, col);
        });
    }

    /// dx += col⁻¹(dcol), the adjoint of `im2col`.
    fn col2im(&self, dcol: &[f32], dx: &mut [f32]) {
        let (p, ow) = (self.p(), self.ow);
        self.for_each_span(|row, oy, span| {
            let Some(span) = span else {
                return;
            };
            let src = &dcol[row * p + oy * ow + span.lo..row * p + oy * ow + span.hi];
            if span.step == 1 {
                // Contiguous: lets the compiler vectorise the accumulation.
                dx[span.start..span.start + src.len()]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(d, v)| *d += v);
            } else {
                for (i, v) in src.iter().enumerate() {
                    dx[span.start + i * span.step] += v;
                }
            }
        });
    }
}

thread_local! {
    /// The column matrix of the image a thread works on, reused across calls.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_columns<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    COLUMNS.with(|c| f(kept_prefix(&mut c.borrow_mut(), len)))
}

/// `dst[x] = src[x / step]` where `x % step == 0`, else 0; `dst` at most `step · src.len()` long.
#[inline]
fn spread(src: &[f32], dst: &mut [MaybeUninit<f32>], step: usize) {
    if step == 2 {
        // Pairs of a fixed size, which the compiler interleaves with vector shuffles.
        let half = dst.len() / 2;
        let mut pairs = dst.chunks_exact_mut(2);
        for (pair, v) in (&mut pairs).zip(src) {
            pair[0].write(*v);
            pair[1].write(0.0);
        }
        if let Some(last) = pairs.into_remainder().first_mut() {
            last.write(src[half]);
        }
        return;
    }
    for (group, v) in dst.chunks_mut(step).zip(src) {
        group[0].write(*v);
        group[1..].iter_mut().for_each(|z| {
            z.write(0.0);
        });
    }
}

/// Threads for the batch dimension vs. inside each GEMM: images in parallel when there are enough of them.
fn split_parallelism(images: usize) -> (bool, Parallelism) {
    let threads = rayon::current_num_threads();
    if images >= threads || threads == 1 {
        (true, Parallelism::None)
    } else {
        (false, Parallelism::Rayon(threads))
    }
}

/// Runs `f(image, out_chunk)` for each image, in parallel over images or with a parallel GEMM inside.
fn per_image<T: Send>(
    out: &mut [T],
    chunk: usize,
    images: usize,
    f: impl Fn(usize, &mut [T], Parallelism) + Sync + Send,
) {
    let (over_images, inner) = split_parallelism(images);
    each_chunk(out, chunk, over_images, |i, o| f(i, o, inner));
}

impl Conv2dOp {
    /// `conv(x, w) (+ residual)` on CPU data of the given shapes; returns the output and its shape. Also for ops
    /// that make the convolution's input themselves (`bn_relu_conv`).
    pub(crate) fn forward_slices(
        &self,
        (x_shape, x): (&Shape, &[f32]),
        (w_shape, w): (&Shape, &[f32]),
        residual: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Shape)> {
        let g = Geometry::new(x_shape, w_shape, self)?;
        let shape = g.out_shape();
        if residual.is_some_and(|r| r.len() != shape.elem_count()) {
            candle_core::bail!(
                "residual of {:?} values added to a convolution output of shape {shape:?}",
                residual.map(<[f32]>::len)
            );
        }
        if g.lanes.is_some() {
            let (isa, _) = g.blocked_isa()?;
            // The blocked kernel's own choice: Winograd's on a blocked input where it applies.
            ran(Pass::Forward, g.algorithm(Pass::Forward, isa));
            let geometry = (g.stride, g.pad);
            let mut y = blocked::conv(
                isa,
                g.input_source(x)?,
                w,
                (g.c_out, g.kh),
                geometry,
                OutputLayout::Blocked,
            )?;
            if let Some(r) = residual {
                for_each_chunk(&mut y, 1 << 14, |i, y| {
                    let r = &r[i << 14..][..y.len()];
                    y.iter_mut().zip(r).for_each(|(v, s)| *v += s)
                });
            }
            return Ok((y, shape));
        }
        let out = match residual {
            None => conv_forward(&g, x, w, None, None)?,
            Some(r) => {
                // Bias 0: (v + 0) + s is v + s, the rounding of a separate add.
                let add = Epilogue {
                    bias: vec![0.0; g.c_out],
                    relu: false,
                };
                conv_forward(&g, x, w, Some(&add), Some(r))?
            }
        };
        Ok((out, shape))
    }
}

/// `Y = W · col(X)`, then per-channel `+ bias` and ReLU when an epilogue is given (folded inference).
/// `residual` (the unit's shortcut, shaped like Y) is added in the epilogue, before its ReLU.
fn conv_forward(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    epilogue: Option<&Epilogue>,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>> {
    // The residual's row for output row `row` (image · C_out + channel) of Y.
    let residual_row = |row: usize| residual.map(|r| &r[row * g.p()..(row + 1) * g.p()]);
    let (k, p) = (g.k(), g.p());
    let fast = match g.dispatch(Pass::Forward) {
        (Algorithm::Winograd, _) => Some(winograd::forward(x, w, g.dims())),
        (Algorithm::Blocked, isa) => Some(blocked::conv(
            isa,
            Source::nchw(x, (g.n, g.c_in, g.h, g.w)),
            w,
            (g.c_out, g.kh),
            (g.stride, g.pad),
            OutputLayout::Nchw,
        )?),
        (Algorithm::StridedPointwise, isa) => Some(g.strided_pointwise().forward(isa, x, w)),
        (Algorithm::Im2colGemm | Algorithm::PointwiseGemm, _) => None,
    };
    if let Some(mut out) = fast {
        if let Some(e) = epilogue {
            for_each_chunk(&mut out, p, |row, y| {
                e.apply(y, row % g.c_out, residual_row(row));
            });
        }
        return Ok(out);
    }
    let mut out = zeroed(g.n * g.image_out());
    // Y = W · col, by blocks of output channels: one block per thread when there are fewer images than
    // threads (measured: faster than the GEMM's own threading, whose synchronisation dominates at batch 1).
    let blocks = |y: &mut [f32], col: &[f32], par: Parallelism| {
        if matches!(par, Parallelism::None) {
            return matmul((g.c_out, p, k), y, false, w, (k, 1), col, (p, 1), par);
        }
        let rows = g.c_out.div_ceil(rayon::current_num_threads());
        for_each_chunk(y, rows * p, |b, yb| {
            let m = yb.len() / p;
            let wb = &w[b * rows * k..(b * rows + m) * k];
            matmul(
                (m, p, k),
                yb,
                false,
                wb,
                (k, 1),
                col,
                (p, 1),
                Parallelism::None,
            );
        });
    };
    per_image(&mut out, g.image_out(), g.n, |i, y, par| {
        let xi = &x[i * g.image_in()..(i + 1) * g.image_in()];
        if g.is_pointwise() {
            blocks(y, xi, par);
        } else {
            with_columns(k * p, |col| {
                match par {
                    Parallelism::None => g.im2col(xi, col),
                    _ => g.im2col_parallel(xi, col),
                }
                blocks(y, col, par);
            });
        }
        if let Some(e) = epilogue {
            for (channel, row) in y.chunks_mut(p).enumerate() {
                e.apply(row, channel, residual_row(i * g.c_out + channel));
            }
        }
    });
    Ok(out)
}

/// What follows a folded convolution: its bias (the folded BN shift) and an optional ReLU.
#[derive(Debug, Clone)]
pub struct Epilogue {
    pub bias: Vec<f32>,
    pub relu: bool,
}

impl Epilogue {
    /// `plane ← ReLU?(plane + bias[channel] (+ residual))`: the same two roundings as a separate add.
    fn apply(&self, plane: &mut [f32], channel: usize, residual: Option<&[f32]>) {
        let (b, floor) = (
            self.bias[channel],
            if self.relu { 0.0 } else { f32::NEG_INFINITY },
        );
        match residual {
            Some(r) => plane
                .iter_mut()
                .zip(r)
                .for_each(|(v, &s)| *v = ((*v + b) + s).max(floor)),
            None => plane.iter_mut().for_each(|v| *v = (*v + b).max(floor)),
        }
    }
}

/// Inference-only convolution with the BN folded in: `ReLU?(conv(x, W') + b)`, arguments `(x, W')`; as a
/// three-argument op `(x, W', s)`, `ReLU?(conv(x, W') + b + s)`: the end of a residual unit in one pass.
#[derive(Debug, Clone)]
pub struct FoldedConv2dOp {
    pub stride: usize,
    pub padding: usize,
    pub epilogue: Epilogue,
}

impl CustomOp2 for FoldedConv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-folded"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, ws, wl, None)
    }
}

impl CustomOp3 for FoldedConv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-folded-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, ws, wl, Some((rs, rl)))
    }
}

impl FoldedConv2dOp {
    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let op = Conv2dOp {
            stride: self.stride,
            padding: self.padding,
        };
        let g = Geometry::new(xl.shape(), wl.shape(), &op)?;
        let shape = Shape::from((g.n, g.c_out, g.oh, g.ow));
        let residual = match residual {
            Some((rs, rl)) if rl.shape() == &shape => Some(contiguous_f32(rs, rl, "residual")?),
            Some((_, rl)) => candle_core::bail!(
                "residual of shape {:?} added to a convolution output of shape {shape:?}",
                rl.shape()
            ),
            None => None,
        };
        let out = conv_forward(
            &g,
            contiguous_f32(xs, xl, "conv2d input")?,
            contiguous_f32(ws, wl, "conv2d weight")?,
            Some(&self.epilogue),
            residual,
        )?;
        Ok((CpuStorage::F32(out), shape))
    }
}

impl Conv2dOp {
    fn input_grad(&self, g: &Geometry, dy: &[f32], w: &[f32]) -> Result<Vec<f32>> {
        if g.lanes.is_some() {
            return self.blocked_input_grad(g, g.blocked_isa()?, dy, w);
        }
        let (k, p) = (g.k(), g.p());
        match g.dispatch(Pass::InputGrad) {
            (Algorithm::Winograd, _) => return Ok(winograd::input_grad(dy, w, g.dims())),
            (Algorithm::Blocked, isa) => {
                let dims = (g.n, g.c_out, g.oh, g.ow);
                return match g.stride {
                    1 => blocked::input_grad_3x3(
                        isa,
                        Source::nchw(dy, dims),
                        w,
                        g.c_in,
                        OutputLayout::Nchw,
                    ),
                    _ => blocked::strided_input_grad_3x3_nchw(isa, dy, dims, w, (g.c_in, g.h, g.w)),
                };
            }
            (Algorithm::StridedPointwise, isa) => {
                return Ok(g.strided_pointwise_input_grad(dy, w, Some(isa)))
            }
            (Algorithm::Im2colGemm | Algorithm::PointwiseGemm, _) => {}
        }
        if g.is_strided_pointwise() {
            return Ok(g.strided_pointwise_input_grad(dy, w, None));
        }
        let mut dx = zeroed(g.n * g.image_in());
        per_image(&mut dx, g.image_in(), g.n, |i, dxi, par| {
            let dyi = &dy[i * g.image_out()..(i + 1) * g.image_out()];
            // Wᵀ: element (k, c_out) of W[c_out, K] sits at c_out·K + k.
            if g.is_pointwise() {
                matmul((k, p, g.c_out), dxi, false, w, (1, k), dyi, (p, 1), par);
            } else {
                with_columns(k * p, |dcol| {
                    matmul((k, p, g.c_out), dcol, false, w, (1, k), dyi, (p, 1), par);
                    g.col2im(dcol, dxi);
                });
            }
        });
        Ok(dx)
    }

    /// `(dx, dw)`. Where both come from the blocked kernels of a stride-1 layer, `dy` goes to the blocked layout
    /// once for both (each converted it on its own: the 8×8 transposes of one more pass over `dy`), and the input
    /// gradient pads the blocked `dy` with plain copies: ResNet-20 training b128 1.026× and 1.016× (two runs of 8
    /// alternated rounds; AMD EPYC Zen 4 only). How a blocked input is padded is `BlockedConv::compute`'s choice.
    fn gradient_slices(
        &self,
        g: &Geometry,
        x: &[f32],
        dy: &[f32],
        w: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        if g.lanes.is_some() {
            return Ok((self.input_grad(g, dy, w)?, self.weight_grad(g, x, dy)?));
        }
        match (g.dispatch(Pass::InputGrad), g.dispatch(Pass::WeightGrad)) {
            ((Algorithm::Blocked, isa), (Algorithm::Blocked, same))
                if isa == same && g.stride == 1 =>
            {
                let dy = Blocked::from_nchw_slice(dy, g.dy_dims(), blocked::lanes(isa))?;
                let dx = blocked::input_grad_3x3(isa, dy.source(), w, g.c_in, OutputLayout::Nchw)?;
                Ok((dx, g.blocked_weight_grad(isa, x, dy.source())?))
            }
            _ => Ok((self.input_grad(g, dy, w)?, self.weight_grad(g, x, dy)?)),
        }
    }

    /// The blocked `dx` of a blocked `dy`: the blocked kernels read it in place. A strided layer's input gradient
    /// that they do not compute goes through NCHW.
    fn blocked_input_grad(
        &self,
        g: &Geometry,
        (isa, lanes): (Isa, usize),
        dy: &[f32],
        w: &[f32],
    ) -> Result<Vec<f32>> {
        let dy = BlockedSlice::new(dy, g.dy_dims(), lanes)?;
        if g.trains_blocked_pointwise(isa) {
            ran(Pass::InputGrad, Algorithm::Blocked);
            let wt = g.strided_pointwise().transposed_weights(w);
            let geometry = (1, 0);
            let sampled = blocked::conv(
                isa,
                Source::Blocked(dy),
                &wt,
                (g.c_in, 1),
                geometry,
                OutputLayout::Blocked,
            )?;
            return Ok(match g.stride {
                1 => sampled,
                s => subsampling_adjoint(&sampled, (g.n, g.c_in, g.h, g.w), (g.c_in, 0), lanes, s),
            });
        }
        match g.stride {
            1 => {
                ran(Pass::InputGrad, g.algorithm(Pass::InputGrad, isa));
                blocked::input_grad_3x3(isa, Source::Blocked(dy), w, g.c_in, OutputLayout::Blocked)
            }
            s if g.blocked_applies(Pass::InputGrad, isa) => {
                debug_assert_eq!(s, 2);
                ran(Pass::InputGrad, Algorithm::Blocked);
                blocked::strided_input_grad_3x3_blocked(isa, dy, w, (g.c_in, g.h, g.w))
            }
            _ => {
                let nchw = Geometry { lanes: None, ..*g };
                let dx = self.input_grad(&nchw, &dy.to_nchw_vec(), w)?;
                blocked::blocked_values(&dx, (g.n, g.c_in, g.h, g.w), lanes)
            }
        }
    }

    fn weight_grad(&self, g: &Geometry, x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        if let Some(lanes) = g.lanes {
            let (isa, _) = g.blocked_isa()?;
            if g.algorithm(Pass::WeightGrad, isa) == Algorithm::Winograd {
                ran(Pass::WeightGrad, Algorithm::Winograd);
                return Ok(winograd::weight_grad_blocked(x, dy, g.dims(), lanes));
            }
            ran(Pass::WeightGrad, Algorithm::Blocked);
            return g.blocked_weight_grad(isa, x, Geometry::blocked(dy, g.dy_dims(), lanes)?);
        }
        let (k, p) = (g.k(), g.p());
        match g.dispatch(Pass::WeightGrad) {
            (Algorithm::Winograd, _) => return Ok(winograd::weight_grad(x, dy, g.dims())),
            (Algorithm::Blocked, isa) => {
                return g.blocked_weight_grad(isa, x, Source::nchw(dy, g.dy_dims()));
            }
            (Algorithm::StridedPointwise, _) => {
                unreachable!("no strided 1×1 weight-gradient kernel")
            }
            (Algorithm::Im2colGemm | Algorithm::PointwiseGemm, _) => {}
        }
        let groups = g.n.div_ceil(WEIGHT_GRAD_GROUP);
        let (over_images, inner) = split_parallelism(groups);
        // Few output channels: dWᵀ[K, C_out] += col(X_n)[K, P] · dY_nᵀ[P, C_out] (row-major), transposed at
        // the end. The gemm crate packs the transposed right-hand side of dW += dY_n · col(X_n)ᵀ slowly when it
        // has few rows per column (16→16 3×3 on 32×32: 32 vs 88 GFLOP/s on one core; it turns a column-major
        // destination back into that case, hence the separate buffer). With many output channels the direct
        // form is faster (ResNet-18, 512→512 on 7×7: 152 vs 102 GFLOP/s on two cores).
        let transposed = g.c_out <= TRANSPOSED_WEIGHT_GRAD_MAX_CHANNELS;
        let group_sum = |grp: usize, dw: &mut [f32]| {
            for i in grp * WEIGHT_GRAD_GROUP..((grp + 1) * WEIGHT_GRAD_GROUP).min(g.n) {
                let xi = &x[i * g.image_in()..(i + 1) * g.image_in()];
                let dyi = &dy[i * g.image_out()..(i + 1) * g.image_out()];
                // colᵀ: element (p, k) of col[K, P] sits at k·P + p; dYᵀ likewise.
                let mut accumulate = |col: &[f32]| match transposed {
                    true => matmul((k, g.c_out, p), dw, true, col, (p, 1), dyi, (1, p), inner),
                    false => matmul((g.c_out, k, p), dw, true, dyi, (p, 1), col, (1, p), inner),
                };
                if g.is_pointwise() {
                    accumulate(xi);
                } else {
                    with_columns(k * p, |col| {
                        g.im2col(xi, col);
                        accumulate(col);
                    });
                }
            }
        };
        // One partial sum per group of images, added in group order: the same result for any thread count.
        let mut partials = vec![vec![0f32; k * g.c_out]; groups];
        if over_images {
            for_each_chunk(&mut partials, 1, |grp, dw| group_sum(grp, &mut dw[0]));
        } else {
            for (grp, dw) in partials.iter_mut().enumerate() {
                group_sum(grp, dw);
            }
        }
        let mut total = vec![0f32; k * g.c_out];
        for part in partials {
            total.iter_mut().zip(part).for_each(|(t, v)| *t += v);
        }
        if !transposed {
            return Ok(total);
        }
        let mut dw = vec![0f32; g.c_out * k];
        for (row, dw_t_row) in total.chunks(g.c_out).enumerate() {
            for (c, v) in dw_t_row.iter().enumerate() {
                dw[c * k + row] = *v;
            }
        }
        Ok(dw)
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.forward_slices(
            (xl.shape(), contiguous_f32(xs, xl, "conv2d input")?),
            (wl.shape(), contiguous_f32(ws, wl, "conv2d weight")?),
            None,
        )?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // No input gradient for an input that needs none (the images entering the stem).
        if !x.track_op() {
            return Ok((None, Some(self.weight_gradient(x, &dy, w.shape())?)));
        }
        let (dx, dw) = self.gradients(x, &dy, w)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl Conv2dOp {
    /// Whether this convolution (`c_in` → `c_out` channels, k×k, on an `h`×`w` input) runs on channel-blocked
    /// training tensors `[N, C/B, H, W, B]` with kernel set `isa` (`ops::channel_blocks`): reading and writing
    /// blocks, the blocked kernels computing its forward and weight gradient, and the input gradient of a stride-1
    /// layer (the others go through NCHW for it); or, `from_images` (a net's stem), reading the NCHW images and
    /// writing blocks ([`Conv2dOp::forward_into_blocks`]: the blocked kernels compute its forward and weight
    /// gradient). Such tensors come in and go out of [`Conv2dOp`] as they are.
    pub fn runs_blocked(
        &self,
        (c_in, c_out, k): (usize, usize, usize),
        (h, w): (usize, usize),
        isa: Isa,
        from_images: bool,
    ) -> bool {
        let (x, weight) = (
            Shape::from((1, c_in, h, w)),
            Shape::from((c_out, c_in, k, k)),
        );
        Geometry::new(&x, &weight, self).is_ok_and(|g| match from_images {
            true => g.writes_blocks(isa),
            false => g.trains_blocked(isa),
        })
    }

    /// `conv(x, w)` of an NCHW `x`, the output in blocks of `lanes` (`[N, C_out/B, H', W', B]`): where a training
    /// pass enters the channel-blocked layout (the stem of the nets of `ResNet::trains_blocked`), without a
    /// conversion of its own. Call where [`Conv2dOp::runs_blocked`] from the images.
    pub fn forward_into_blocks(&self, x: &Tensor, w: &Tensor, lanes: usize) -> Result<Tensor> {
        let op = IntoBlocks { op: *self, lanes };
        x.contiguous()?.apply_op2(&w.contiguous()?, op)
    }

    /// The gradient of the input (of shape `x_shape`) from the output gradient `dy`, on the CPU.
    pub fn input_gradient(&self, dy: &Tensor, w: &Tensor, x_shape: &Shape) -> Result<Tensor> {
        dy.apply_op2_no_bwd(
            w,
            &InputGrad {
                op: *self,
                x_shape: x_shape.clone(),
            },
        )
    }

    /// `(dx, dw)` from the input `x`, the output gradient `dy` and the weight `w`: as [`Conv2dOp::input_gradient`]
    /// and [`Conv2dOp::weight_gradient`], sharing their conversions of `dy` where they can (`gradient_slices`).
    pub fn gradients(&self, x: &Tensor, dy: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
        let op = BothGrads {
            op: *self,
            w_shape: w.shape().clone(),
            dw: Mutex::new(None),
        };
        let dx = x.apply_op3_no_bwd(&dy.contiguous()?, &w.contiguous()?, &op)?;
        let dw = op.dw.into_inner().unwrap_or_else(|e| e.into_inner());
        let Some(dw) = dw else {
            candle_core::bail!("conv2d gradients: the weight gradient was not computed");
        };
        Ok((dx, Tensor::from_vec(dw, w.shape(), x.device())?))
    }

    /// The gradient of the weight (of shape `w_shape`) from the input `x` and the output gradient `dy`.
    pub fn weight_gradient(&self, x: &Tensor, dy: &Tensor, w_shape: &Shape) -> Result<Tensor> {
        x.apply_op2_no_bwd(
            dy,
            &WeightGrad {
                op: *self,
                w_shape: w_shape.clone(),
            },
        )
    }
}

/// `(x, w) → conv(x, w)` of an NCHW `x`, written in blocks (see [`Conv2dOp::forward_into_blocks`]).
struct IntoBlocks {
    op: Conv2dOp,
    lanes: usize,
}

impl CustomOp2 for IntoBlocks {
    fn name(&self) -> &'static str {
        "conv2d-into-blocks"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl.shape(), wl.shape(), &self.op)?;
        let (isa, l) = (Isa::current(), self.lanes);
        if g.lanes.is_some() || blocked::lanes(isa) != l || !g.writes_blocks(isa) {
            candle_core::bail!(
                "conv2d into blocks of {l}: input {:?}, weight {:?}: the {isa} kernel set writes blocks of {} \
                 where its blocked kernels compute the forward and the weight gradient",
                xl.shape(),
                wl.shape(),
                blocked::lanes(isa)
            );
        }
        ran(Pass::Forward, Algorithm::Blocked);
        let y = blocked::conv(
            isa,
            Source::nchw(
                contiguous_f32(xs, xl, "conv2d input")?,
                (g.n, g.c_in, g.h, g.w),
            ),
            contiguous_f32(ws, wl, "conv2d weight")?,
            (g.c_out, g.kh),
            (g.stride, g.pad),
            OutputLayout::Blocked,
        )?;
        Ok((
            CpuStorage::F32(y),
            Shape::from((g.n, g.c_out / l, g.oh, g.ow, l)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dw = self.op.weight_gradient(x, &dy, w.shape())?;
        // The images entering the stem need no gradient; another input gets it through NCHW.
        let dx = match x.track_op() {
            true => Some(self.op.input_gradient(&from_blocked(&dy)?, w, x.shape())?),
            false => None,
        };
        Ok((dx, Some(dw)))
    }
}

/// `(dy, w) → dx`.
struct InputGrad {
    op: Conv2dOp,
    x_shape: Shape,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        ds: &CpuStorage,
        dl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(&self.x_shape, wl.shape(), &self.op)?;
        let dx = self.op.input_grad(
            &g,
            contiguous_f32(ds, dl, "conv2d gradient")?,
            contiguous_f32(ws, wl, "conv2d weight")?,
        )?;
        Ok((CpuStorage::F32(dx), self.x_shape.clone()))
    }
}

/// `(x, dy, w) → dx`, with dw left in `dw` (candle's custom ops make one tensor).
struct BothGrads {
    op: Conv2dOp,
    w_shape: Shape,
    dw: Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for BothGrads {
    fn name(&self) -> &'static str {
        "conv2d-gradients"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if wl.shape() != &self.w_shape {
            candle_core::bail!(
                "conv2d gradients: weight {:?}, expected {:?}",
                wl.shape(),
                self.w_shape
            );
        }
        let g = Geometry::new(xl.shape(), wl.shape(), &self.op)?;
        if dyl.shape() != &g.out_shape() {
            candle_core::bail!(
                "conv2d gradients: output gradient {:?}, expected {:?}",
                dyl.shape(),
                g.out_shape()
            );
        }
        let (dx, dw) = self.op.gradient_slices(
            &g,
            contiguous_f32(xs, xl, "conv2d input")?,
            contiguous_f32(dys, dyl, "conv2d gradient")?,
            contiguous_f32(ws, wl, "conv2d weight")?,
        )?;
        *self.dw.lock().unwrap_or_else(|e| e.into_inner()) = Some(dw);
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// `(x, dy) → dw`.
struct WeightGrad {
    op: Conv2dOp,
    w_shape: Shape,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl.shape(), &self.w_shape, &self.op)?;
        let (x, dy) = (
            contiguous_f32(xs, xl, "conv2d input")?,
            contiguous_f32(ds, dl, "conv2d gradient")?,
        );
        // An NCHW input's output gradient in blocks (`Conv2dOp::forward_into_blocks`).
        if let (&[_, _, _, _, lanes], None) = (dl.shape().dims(), g.lanes) {
            let isa = Isa::current();
            if blocked::lanes(isa) != lanes || !g.blocked_applies(Pass::WeightGrad, isa) {
                candle_core::bail!(
                    "conv2d weight gradient: output gradient {:?} in blocks the {isa} kernel set does not read",
                    dl.shape()
                );
            }
            ran(Pass::WeightGrad, Algorithm::Blocked);
            let dy = Source::Blocked(BlockedSlice::new(dy, g.dy_dims(), lanes)?);
            let dw = g.blocked_weight_grad(isa, x, dy)?;
            return Ok((CpuStorage::F32(dw), self.w_shape.clone()));
        }
        let dw = self.op.weight_grad(&g, x, dy)?;
        Ok((CpuStorage::F32(dw), self.w_shape.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        let m: f32 = b
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        d / m.max(1e-12)
    }

    /// Every kind of convolution the registered nets use, odd sizes included, against candle's reference op.
    #[test]
    fn forward_and_both_gradients_equal_candles_reference() -> Result<()> {
        let dev = Device::Cpu;
        // (n, c_in, h, w, c_out, k, stride, pad). Strided cases are square: candle 0.11's own conv backward
        // (the reference) computes the transposed-conv output padding from the height alone.
        let cases = [
            (3, 4, 9, 8, 5, 3, 1, 1),
            (2, 3, 11, 11, 6, 3, 2, 1),
            (2, 6, 7, 7, 8, 1, 1, 0),
            (2, 6, 7, 7, 8, 1, 2, 0),
            (2, 3, 23, 23, 4, 7, 2, 3),
            (2, 3, 24, 24, 4, 7, 2, 3),
            (1, 5, 6, 6, 3, 3, 1, 1),
            (17, 2, 5, 5, 3, 3, 2, 1),
            // More output channels than TRANSPOSED_WEIGHT_GRAD_MAX_CHANNELS: the direct weight gradient.
            (3, 4, 6, 6, 130, 3, 1, 1),
            (2, 8, 5, 5, 136, 1, 2, 0),
            // The blocked kernels (with AVX2 or AVX-512): one and two channel blocks, planes narrower than a
            // register tile and wider than two.
            (2, 16, 5, 32, 16, 3, 1, 1),
            (3, 16, 4, 21, 32, 3, 1, 1),
            (1, 32, 3, 16, 16, 3, 1, 1),
            (2, 16, 6, 8, 16, 3, 1, 1),
            // Winograd through this op's dispatch (forward, input gradient with the channel counts swapped,
            // weight gradient): F(2×2) tiles in groups of images, and F(4×4) on one image with every stage on
            // all threads.
            (2, 128, 16, 16, 136, 3, 1, 1),
            (1, 72, 28, 28, 64, 3, 1, 1),
        ];
        for (n, inp, out, side, tile) in [
            (2, 128, 136, 16, winograd::Tile::F2),
            (1, 72, 64, 28, winograd::Tile::F4),
        ] {
            let plane = (side, side);
            assert_eq!(winograd::Tile::for_plane(plane), tile);
            assert!(
                winograd::applies(n, (inp, out), plane) && winograd::applies(n, (out, inp), plane)
            );
            assert!(winograd::weight_grad_applies(n, (inp, out), plane));
        }
        for (n, ci, h, w, co, k, s, p) in cases {
            let x = Var::randn(0f32, 1.0, (n, ci, h, w), &dev)?;
            let wt = Var::randn(0f32, 1.0, (co, ci, k, k), &dev)?;
            let ours = x.as_tensor().apply_op2(
                wt.as_tensor(),
                Conv2dOp {
                    stride: s,
                    padding: p,
                },
            )?;
            let reference = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1)?;
            assert_eq!(ours.dims(), reference.dims());
            assert!(
                max_rel(&ours, &reference) < 1e-5,
                "forward {:?}",
                (n, ci, h, w, co, k, s, p)
            );
            let up = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
            let g_ours = (ours * &up)?.sum_all()?.backward()?;
            let g_ref = (reference * &up)?.sum_all()?.backward()?;
            for (name, v) in [("input", &x), ("weight", &wt)] {
                let rel = max_rel(g_ours.get(v).unwrap(), g_ref.get(v).unwrap());
                assert!(
                    rel < 1e-5,
                    "{name} gradient {:?}: {rel}",
                    (n, ci, h, w, co, k, s, p)
                );
            }
        }
        Ok(())
    }

    /// The forward with a residual (as the pre-activation units' last BN-ReLU-conv adds its shortcut) on a
    /// channel-blocked input: the blocked values of candle's `conv2d` + residual with the kernel set in use (the
    /// portable set, which has no blocked kernels, refuses the input).
    #[test]
    fn blocked_forward_adds_the_residual() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, side) = (2, 32, 8);
        let x = Tensor::randn(0f32, 1.0, (n, c, side, side), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (c, c, 3, 3), &dev)?;
        let r = Tensor::randn(0f32, 1.0, (n, c, side, side), &dev)?;
        let expected = (x.conv2d(&w, 1, 1, 1, 1)? + &r)?;
        let op = Conv2dOp {
            stride: 1,
            padding: 1,
        };
        let isa = Isa::current();
        let lanes = blocked::lanes(isa);
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let blocked = |t: &Tensor| blocked::blocked_values(&flat(t)?, t.dims4()?, lanes);
        let (xb, rb) = (blocked(&x)?, blocked(&r)?);
        let x_shape = Shape::from((n, c / lanes, side, side, lanes));
        let out = op.forward_slices((&x_shape, &xb), (w.shape(), &flat(&w)?), Some(&rb));
        if isa == Isa::Generic {
            assert!(out.is_err(), "the portable set has no blocked kernels");
            return Ok(());
        }
        let (y, shape) = out?;
        assert_eq!(shape, x_shape, "{isa}");
        let want = blocked(&expected)?;
        let diff = y
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{isa}: max |diff| {diff}");
        Ok(())
    }
}
