//! Direct convolution in the blocked layout with the folded BatchNorm's bias, the residual and the ReLU
//! applied as the accumulators are stored: one pass over the output per layer, as in oneDNN and ONNX Runtime's
//! NCHWc kernels.
//!
//! The register tile is `F` blocks of output channels × `R` output columns of one row: every step broadcasts
//! one input value per column and loads `F` weight vectors, then does `F·R` FMAs. The steps run over the input
//! channel blocks, the kernel rows and, contiguous in both the padded input and the packed weights, the
//! kernel columns × the channels of a block. A task is one output row of one group of `F` blocks of one image.

use super::layout::{block_to_nchw, Blocked, BlockedSlice, Padded, Source};
use crate::ops::cpu_slice::{init_aligned, written_by, LineAligned, Scratch};
use crate::ops::isa::Isa;
use crate::ops::parallel;
use crate::ops::parallel::for_each_chunk;
use crate::ops::simd::{Portable, Simd};
use crate::ops::winograd;
use candle_core::{Result, Tensor};
use seq_macro::seq;
use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Columns per register tile at most (a `match` below instantiates each; `tile` writes out 12 column steps).
const MAX_COLUMNS: usize = 12;
const _: () = assert!(MAX_COLUMNS == 12);

/// Input channels per pass over a row (see `row`).
const CHUNK_CHANNELS: usize = 64;

/// Input channels per pass where a task takes several rows (see [`rows_per_task`]).
const MULTI_ROW_CHUNK_CHANNELS: usize = 16;

/// Tiles per row up to which a task of a forward takes several rows (see [`rows_per_task`]). ResNet-50's strided and
/// 7×7 3×3 layers, one layer called alternately with one row and with several per task, 200 calls each at batch 1 (30
/// at 16), median GFLOP/s (Intel Xeon, 2 FMA units, 2 threads): 512→512 on 7×7 249 → 279 (b16 level), 512→512 /2 on
/// 14×14 226 → 255 (b16 173 → 202), 256→256 /2 on 28×28 (3 tiles a row) 263 → 276 (b16 210 → 226), 128→128 /2 on 56×56
/// (6) 235 → 251 (b16 233 → 247); CIFAR's 16-channel layers at b32 and b128 level or up to 1.04×.
const MULTI_ROW_TILES: usize = 6;

/// Multiply-adds ×2 that one thread takes at least at a time.
pub(super) const MIN_TASK_FLOPS: usize = 4_000_000;

/// Images per thread from which a batch is padded image by image.
pub(super) const PER_IMAGE_BATCHES: usize = 2;

thread_local! {
    /// One padded image, per thread (see `compute`).
    static IMAGE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One image's blocked output on its way to NCHW, per thread (see `compute`).
    static OUT_IMAGE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether `values` f32 weights stay in L2 beside the input rows: half of this CPU's L2 at most (256 KB on Zen
/// 2 and 3, 512 KB on Zen 4, 1 MB on Xeons since Sapphire Rapids). It was 256 KB everywhere; with 1 MB, ResNet-50's
/// layers called in turn, 150 rounds, each layer alternately both ways, median µs at batch 1 (Intel Xeon, 2 MB
/// L2): 128→128 3×3/2 on 56×56 (590 KB of weights) 940 → 845, 256→512 1×1/2 on 56×56 (512 KB) 870 → 787, the other
/// 12 layers level; at batch 16 (12 rounds) 256→512 1×1/2 14.4 → 11.9 ms, 512→512 3×3 on 7×7 (Winograd) 10.4 →
/// 10.0, the others level. With 2 MB, 512→1024 1×1/2 on 28×28 (2 MB) ran 0.82×. Not measured on AMD: there the
/// bound moved from 256 KB to 512 KB on Zen 4 and stayed on Zen 2 and 3.
fn weights_stay(values: usize) -> bool {
    values * std::mem::size_of::<f32>() <= crate::ops::cache_size::l2_bytes() / 2
}

/// Output pixels per image (uses of each weight per image) from which an NCHW input is padded image by image
/// even where the weights leave L2: the image's rows then stay in cache while the weights stream from L3.
/// ResNet-18 training's strided forwards at batch 16, whole batch / image by image, GFLOP/s (`bench --convs`,
/// 6 alternated rounds in a noisy VM, AMD EPYC Zen 4): 64→128 on 56×56 (784 pixels out) 133–170 / 165–202,
/// 128→256 on 28×28 (196) 84–173 / 90–185 (faster in 4 of 6), 256→512 on 14×14 (49) 98–171 / 88–126 (3 rounds:
/// slower in all).
const PER_IMAGE_MIN_PIXELS: usize = 196;

/// Register tiles per task at most.
pub(super) const SEGMENT_TILES: usize = 8;

/// Register tiles per task at most where a plane runs as one row (1×1, stride 1): a task reads its group's
/// weights once for all its columns. ResNet-50's 1×1 layers at batch 1, one layer of 12 in turn (their weights
/// from L3, as in the net), 300 calls each, segments of 8 tiles against 40 (whole 14×14 and 7×7 planes), median
/// GFLOP/s (Intel Xeon, 2 FMA units, 2 threads): 1024→256 on 14×14 292 → 318, 512→2048 on 7×7 203 → 267, 2048→512
/// on 7×7 (whole planes) 215 → 272, 512→256 on 28×28 1.03×, 56×56 layers level (also at batch 16).
const POINTWISE_SEGMENT_TILES: usize = 40;

/// Output columns from which a strided 1×1 convolution of a blocked input reads its input pixels in place (each
/// one or half a cache line) rather than subsampled into a copy first. ResNet-18's projections at batch 16 in
/// `bench --train --convs`, forward GFLOP/s, copy / in place (Intel Xeon, 2 FMA units, 3 alternated runs with
/// AVX-512, 2 with AVX2): 64→128 on 56×56 141–146 / 190–207 (AVX2 90–92 / 120–121), 128→256 on 28×28 178–181
/// / 205–210 (104–109 / 124–125); 256→512 on 14×14, 7-column rows, 171–179 / 148–151 in place. ResNet-50's at
/// batch 16, blocked inference, with weights (512 KB, 2 MB) beyond what `weights_stay` then kept (256 KB):
/// 256→512 on 56×56 231–236 / 211–214, 512→1024 on 28×28 268–273 / 222–223 in place; hence the rule below.
const STRIDED_POINTWISE_MIN_WIDTH: usize = 14;

/// A convolution with its weights packed for one kernel set, `ReLU?(conv(x) + bias (+ residual))`.
#[derive(Debug, Clone)]
pub struct BlockedConv {
    isa: Isa,
    lanes: usize,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// Output blocks per register tile (`F`).
    group: usize,
    /// Input channels per block of the packed input: the lanes, or all channels of a narrow input.
    bi: usize,
    /// `[C_out / (F·B)][C_in / bi][k][k][bi][F][B]`.
    weights: LineAligned,
    bias: LineAligned,
    relu: bool,
    /// Winograd's transformed weights for each [`winograd::Tile`] (indexed by it), made on the first forward
    /// that takes [`BlockedAlgorithm::Winograd`] with that tile.
    winograd: [OnceLock<Vec<f32>>; 2],
}

/// How [`BlockedConv::forward`] computes a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum BlockedAlgorithm {
    /// The direct kernel (the register tiles of this file).
    Direct,
    /// Winograd F(2×2, 3×3) or F(4×4, 3×3) (`ops::winograd`), transforms reading and writing the blocked layout.
    Winograd,
}

/// The lanes of `isa`'s blocked layout.
pub fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => Avx512Lanes::LANES,
        Isa::Avx2 | Isa::Generic => Portable::LANES,
    }
}

#[cfg(target_arch = "x86_64")]
type Avx512Lanes = crate::ops::simd::Avx512;
#[cfg(not(target_arch = "x86_64"))]
type Avx512Lanes = Portable;

impl BlockedConv {
    /// Whether a convolution to `c_out` channels has a blocked kernel on `isa`.
    pub fn applies(isa: Isa, c_out: usize) -> bool {
        c_out.is_multiple_of(lanes(isa))
    }

    /// `weight` `[C_out, C_in, k, k]` and `bias` `[C_out]` (the folded BatchNorm's shift).
    pub fn new(
        isa: Isa,
        weight: &Tensor,
        bias: &[f32],
        geometry: (usize, usize),
        relu: bool,
    ) -> Result<Self> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if kh != kw {
            candle_core::bail!(
                "blocked conv: weight {:?}: expected a square kernel",
                weight.dims()
            );
        }
        let w = weight.flatten_all()?.to_vec1::<f32>()?;
        Self::from_slice(isa, &w, (c_out, c_in, kh), bias, geometry, relu)
    }

    /// As [`BlockedConv::new`], the weight `[C_out, C_in, k, k]` as a slice.
    pub fn from_slice(
        isa: Isa,
        w: &[f32],
        dims: (usize, usize, usize),
        bias: &[f32],
        geometry: (usize, usize),
        relu: bool,
    ) -> Result<Self> {
        let mut conv = Self::unpacked(isa, w, dims, bias, geometry, relu)?;
        conv.weights = conv.pack(w);
        Ok(conv)
    }

    /// As [`BlockedConv::from_slice`] without bias or ReLU, for one [`BlockedConv::forward_values`] on `x` (a
    /// training op's call): where that forward runs Winograd's algorithm, the weights are transformed straight
    /// from `w` instead of being packed for the direct kernel (and unpacked again for the transform), which the
    /// call never reads. (`forward_nchw` always runs the direct kernel: it then reports an error.)
    pub fn for_input(
        isa: Isa,
        w: &[f32],
        (c_out, c_in, k): (usize, usize, usize),
        geometry: (usize, usize),
        x: Source,
    ) -> Result<Self> {
        let bias = vec![0.0; c_out];
        Ok(
            Self::unpacked(isa, w, (c_out, c_in, k), &bias, geometry, false)?.ready_for(
                x,
                |tile| winograd::forward_weights(w, (c_out, c_in), tile),
                || Cow::Borrowed(w),
            ),
        )
    }

    /// As [`BlockedConv::for_input`] for the input gradient of a 3×3, stride-1, padding-1 convolution with `w`
    /// `[C_out, C_in, 3, 3]`: the convolution of `dy` with the kernels flipped and their channel axes swapped,
    /// from `c_out` to `c_in` channels. Where it runs Winograd's algorithm, the transform reads `w` itself
    /// (no flipped copy first); else `flipped(w)` gives the weights to pack.
    pub fn for_input_grad(
        isa: Isa,
        w: &[f32],
        c_in: usize,
        dy: Source,
        flipped: impl FnOnce() -> Vec<f32>,
    ) -> Result<Self> {
        let (_, c_out, _, _) = dy.dims();
        let bias = vec![0.0; c_in];
        Ok(
            Self::unpacked(isa, w, (c_in, c_out, 3), &bias, (1, 1), false)?.ready_for(
                dy,
                |tile| winograd::input_grad_weights(w, (c_out, c_in), tile),
                || Cow::Owned(flipped()),
            ),
        )
    }

    /// The weights that one forward on `x` reads: Winograd's transform `u(tile)` where that forward runs
    /// Winograd's algorithm, else the direct kernel's packing of `direct()` (`[C_out, C_in, k, k]`).
    fn ready_for<'w>(
        mut self,
        x: Source,
        u: impl FnOnce(winograd::Tile) -> Vec<f32>,
        direct: impl FnOnce() -> Cow<'w, [f32]>,
    ) -> Self {
        match (self.algorithm(x), x) {
            (BlockedAlgorithm::Winograd, Source::Blocked(b)) => {
                let tile = winograd::Tile::for_blocked((b.h, b.w));
                self.winograd[tile as usize] = OnceLock::from(u(tile));
            }
            _ => self.weights = self.pack(&direct()),
        }
        self
    }

    /// The convolution's checked fields, its packed weights still empty (see [`BlockedConv::pack`]).
    fn unpacked(
        isa: Isa,
        w: &[f32],
        (c_out, c_in, k): (usize, usize, usize),
        bias: &[f32],
        (stride, padding): (usize, usize),
        relu: bool,
    ) -> Result<Self> {
        if isa > Isa::best_available() {
            candle_core::bail!("blocked conv: this CPU does not run {isa} kernels");
        }
        let lanes = lanes(isa);
        if w.len() != c_out * c_in * k * k
            || !Self::applies(isa, c_out)
            || bias.len() != c_out
            || stride == 0
        {
            candle_core::bail!(
                "blocked conv: {} weights for [{c_out}, {c_in}, {k}, {k}] with {} biases, stride {stride}: \
                 expected that many, a bias per output channel and output channels in blocks of {lanes}",
                w.len(),
                bias.len()
            );
        }
        let bi = if c_in.is_multiple_of(lanes) {
            lanes
        } else {
            c_in
        };
        Ok(Self {
            isa,
            lanes,
            c_in,
            c_out,
            kernel: k,
            stride,
            padding,
            group: output_group(isa, c_out / lanes),
            bi,
            weights: LineAligned::from_slice(&[]),
            bias: LineAligned::from_slice(bias),
            relu,
            winograd: Default::default(),
        })
    }

    /// `w` `[C_out, C_in, k, k]` packed for the direct kernel: `[C_out / (F·B)][C_in / bi][k][k][bi][F][B]`.
    fn pack(&self, w: &[f32]) -> LineAligned {
        let (c_in, k, group, lanes, bi) = (self.c_in, self.kernel, self.group, self.lanes, self.bi);
        let packed = (0..self.c_out / (group * lanes)).flat_map(move |g| {
            (0..c_in / bi).flat_map(move |cb| {
                (0..k * k).flat_map(move |tap| {
                    (0..bi).flat_map(move |i| {
                        (0..group * lanes).map(move |o| {
                            let (o, c) = (g * group * lanes + o, cb * bi + i);
                            w[(o * c_in + c) * k * k + tap]
                        })
                    })
                })
            })
        });
        LineAligned::from_values(w.len(), packed)
    }

    /// Output channels.
    pub fn c_out(&self) -> usize {
        self.c_out
    }

    pub fn output_size(&self, input: usize) -> usize {
        (input + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// The algorithm [`BlockedConv::forward`] runs on `x`: Winograd's for a blocked batch into a 3×3, stride-1,
    /// padding-1 layer where [`winograd::blocked_applies`] (32 channels or more on planes from 8×8, 128 below;
    /// enough tiles per GEMM, or one image of 14×14 or more), else the direct kernel. The figures are at
    /// [`winograd::Tile::for_blocked`].
    pub fn algorithm(&self, x: Source) -> BlockedAlgorithm {
        let (n, _, h, w) = x.dims();
        let winograd = matches!(x, Source::Blocked(_))
            && (self.kernel, self.stride, self.padding) == (3, 1, 1)
            && winograd::blocked_applies(n, (self.c_in, self.c_out), (h, w));
        match winograd {
            true => BlockedAlgorithm::Winograd,
            false => BlockedAlgorithm::Direct,
        }
    }

    /// `ReLU?(conv(x) + bias (+ residual))` in the blocked layout.
    pub fn forward(&self, x: Source, residual: Option<&Blocked>) -> Result<Blocked> {
        match self.run(x, residual, Dest::Blocked)? {
            Output::Blocked(b) => Ok(b),
            _ => unreachable!("a blocked output was asked for"),
        }
    }

    /// `ReLU?(conv(x) + bias)` in the blocked layout, in a plain vector: the storage of a training tensor
    /// (`ops::conv`), which outlives the call.
    pub fn forward_values(&self, x: Source) -> Result<Vec<f32>> {
        Ok(match self.run(x, None, Dest::Values)? {
            Output::Values(v) => v,
            Output::Blocked(b) => b.data.to_vec(),
            Output::Nchw(_) => unreachable!("blocked values were asked for"),
        })
    }

    fn run(&self, x: Source, residual: Option<&Blocked>, dest: Dest) -> Result<Output> {
        self.check(x, residual)?;
        if let (Source::Blocked(b), BlockedAlgorithm::Winograd) = (x, self.algorithm(x)) {
            return Ok(self.winograd(b, residual, dest));
        }
        let (_, _, _, w) = x.dims();
        if self.kernel == 1
            && self.stride > 1
            && self.padding == 0
            && (self.output_size(w) < STRIDED_POINTWISE_MIN_WIDTH
                || !weights_stay(self.weights.len()))
        {
            // A strided 1×1 convolution onto short output rows runs faster subsampled first, as a stride-1 one
            // over the whole plane (one long row, see `compute`), and so does one whose weights leave L2 (each
            // group of output blocks then streams the input again, a quarter of it once subsampled); longer
            // rows under weights that stay read their pixels in place.
            if let Source::Blocked(b) = x {
                let sub = super::pool::zero_pad_shortcut(b, self.stride, 0, 0)?;
                return Ok(self.compute(sub.source(), residual, 1, dest));
            }
        }
        Ok(self.compute(x, residual, self.stride, dest))
    }

    /// `ReLU?(conv(x) + bias)` as `[N, C_out, H', W']`: where the batch is padded image by image, each image's
    /// output goes to NCHW while it is in the thread's cache, instead of in a pass over the whole batch after.
    pub fn forward_nchw(&self, x: Source) -> Result<Vec<f32>> {
        self.check(x, None)?;
        if self.weights.is_empty() {
            candle_core::bail!(
                "blocked conv: weights made for Winograd's algorithm alone (`for_input`), not the direct kernel"
            );
        }
        Ok(match self.compute(x, None, self.stride, Dest::Nchw) {
            Output::Nchw(v) | Output::Values(v) => v,
            Output::Blocked(b) => b.to_nchw_vec(),
        })
    }

    /// The Winograd forward of a checked blocked input (3×3, stride 1, padding 1: the output is the input's size),
    /// blocked, in a plain vector for `Dest::Values`.
    fn winograd(&self, x: BlockedSlice, residual: Option<&Blocked>, dest: Dest) -> Output {
        let tile = winograd::Tile::for_blocked((x.h, x.w));
        let u = self.winograd[tile as usize].get_or_init(|| {
            winograd::forward_weights(&self.unpacked_weights(), (self.c_out, self.c_in), tile)
        });
        let finish = winograd::Finish {
            bias: &self.bias,
            relu: self.relu,
            residual: residual.map(|r| &*r.data),
        };
        let dims = (x.n, self.c_in, self.c_out, x.h, x.w);
        let len = x.n * self.c_out * x.h * x.w;
        let fill = |y: &mut [MaybeUninit<f32>]| {
            winograd::forward_blocked(x.data, (u, tile, self.isa), dims, self.lanes, finish, y)
        };
        if dest == Dest::Values {
            // SAFETY: `forward_blocked` writes every value of its output.
            return Output::Values(unsafe { written_by(len, fill) });
        }
        // SAFETY: as above.
        let data = unsafe { Scratch::written_by(len, fill) };
        Output::Blocked(Blocked {
            data,
            n: x.n,
            c: self.c_out,
            h: x.h,
            w: x.w,
            lanes: self.lanes,
        })
    }

    /// The weights `[C_out, C_in, k, k]` back from their packing `[group][input block][tap][bi][F·B]` (see
    /// `from_slice`), one output channel per task. (Five divisions per value made it ~1 % of a ResNet-20
    /// training step, whose Winograd layers unpack their weights on every call.)
    fn unpacked_weights(&self) -> Vec<f32> {
        let (kk, fb, bi) = (self.kernel * self.kernel, self.group * self.lanes, self.bi);
        let mut w = vec![0f32; self.c_out * self.c_in * kk];
        for_each_chunk(&mut w, self.c_in * kk, |o, wo| {
            let (g, oo) = (o / fb, o % fb);
            let group = &self.weights[g * self.c_in * kk * fb..][..self.c_in * kk * fb];
            // Value (cb, tap, i) of the group sits at ((cb·kk + tap)·bi + i)·fb + oo.
            for (cb, block) in group.chunks_exact(kk * bi * fb).enumerate() {
                for (tap, taps) in block.chunks_exact(bi * fb).enumerate() {
                    for (i, lanes) in taps.chunks_exact(fb).enumerate() {
                        wo[(cb * bi + i) * kk + tap] = lanes[oo];
                    }
                }
            }
        });
        w
    }

    /// Whether `x` (and `residual`) fit this convolution.
    fn check(&self, x: Source, residual: Option<&Blocked>) -> Result<()> {
        let (n, c, h, w) = x.dims();
        if c != self.c_in
            || h + 2 * self.padding < self.kernel
            || w + 2 * self.padding < self.kernel
        {
            candle_core::bail!(
                "blocked conv: input [{n}, {c}, {h}, {w}] for a {}×{k}×{k} kernel from {} channels \
                 (padding {})",
                self.c_out,
                self.c_in,
                self.padding,
                k = self.kernel
            );
        }
        if let Source::Blocked(b) = x {
            if b.lanes != self.lanes {
                candle_core::bail!(
                    "blocked conv: input blocks of {}, kernel of {}",
                    b.lanes,
                    self.lanes
                );
            }
        }
        let (oh, ow) = (self.output_size(h), self.output_size(w));
        if let Some(r) = residual {
            if (r.n, r.c, r.h, r.w, r.lanes) != (n, self.c_out, oh, ow, self.lanes) {
                candle_core::bail!(
                    "blocked conv: residual [{}, {}, {}, {}] (blocks of {}) for an output [{n}, {}, {oh}, {ow}]",
                    r.n, r.c, r.h, r.w, r.lanes, self.c_out
                );
            }
        }
        Ok(())
    }

    /// The convolution at `stride` (the layer's own, or 1 on a plane already subsampled), operands checked,
    /// into `dest` (`Dest::Nchw`: in `[N, C, H, W]` where the batch is padded image by image, then without a
    /// residual; blocked otherwise).
    fn compute(&self, x: Source, residual: Option<&Blocked>, stride: usize, dest: Dest) -> Output {
        let nchw = dest == Dest::Nchw;
        let (n, _, h, w) = x.dims();
        let out = |side: usize| (side + 2 * self.padding - self.kernel) / stride + 1;
        let (oh, ow) = (out(h), out(w));
        // A large batch is padded image by image, just before the image's rows run: the copy stays in the
        // thread's cache, where a copy of the whole batch went out to memory and back. Where the weights leave
        // L2, each image streams them again (a group at a time, see `run`): that pays on a blocked input
        // (ResNet-50 inference at batch 16: faster in 8 of 9 alternated rounds, 22.5–23.1 → 23.4–24.2 img/s
        // where neither run hit a slow VM minute, AMD EPYC Zen 4), not on an NCHW one, whose whole-batch copy is
        // also its conversion (ResNet-18 training at batch 16: 14.5–15.4 img/s with it, 13.7–14.8 without), nor
        // where the output goes to NCHW (training's input gradient of a blocked `dy`: ResNet-18 b16 0.91× padded
        // image by image, 1.03× and 1.056× padded whole — 6 and 8 alternated rounds, faster in 9 of 14; Zen 4).
        // An NCHW input is padded image by image where its image uses each weight often enough
        // ([`PER_IMAGE_MIN_PIXELS`]).
        let weights_stay = weights_stay(self.weights.len());
        let per_image = match x {
            Source::Blocked(_) => weights_stay || !nchw,
            Source::Nchw { .. } => weights_stay || oh * ow >= PER_IMAGE_MIN_PIXELS,
        } && n >= PER_IMAGE_BATCHES * rayon::current_num_threads();
        let input = Padded::new(x, self.padding, self.bi, per_image);
        let (b, f, k) = (self.lanes, self.group, self.kernel);
        let groups = self.c_out / (f * b);
        let out_plane = oh * ow * b;
        let x_plane = input.h * input.w * input.bi;
        let columns = max_columns(self.isa, f);
        // A 1×1 stride-1 convolution reads its input pixel by pixel, rows running on: one long row per plane.
        let (rows, width) = match (k, stride) {
            (1, 1) => (1, oh * ow),
            _ => (oh, ow),
        };
        // Long rows are cut into even segments, so that a batch of one image still makes many tasks.
        let segments = match rows {
            // A plane read as one row: each task streams its group's weights once, so the segments are long,
            // as long as the threads get two tasks each.
            1 => width
                .div_ceil(POINTWISE_SEGMENT_TILES * columns)
                .max((2 * rayon::current_num_threads()).div_ceil(n * groups))
                .min(width.div_ceil(columns)),
            _ => width.div_ceil(SEGMENT_TILES * columns),
        };
        let segment = width.div_ceil(segments);
        let rows_per_task = match k > 1 && segments == 1 {
            true => rows_per_task(rows, width, (columns, MULTI_ROW_TILES), n * groups),
            false => 1,
        };
        let job = Row {
            x: std::ptr::null(),
            w: self.weights.as_ptr(),
            bias: self.bias.as_ptr(),
            out: std::ptr::null_mut(),
            residual: residual.map_or(std::ptr::null(), |r| r.data.as_ptr()),
            relu: self.relu,
            blocks_in: input.blocks,
            x_plane,
            x_row: input.w * input.bi,
            x_step: stride * input.bi,
            kernel: k,
            taps_per_row: k * input.bi,
            w_plane: k * k * input.bi * f * b,
            w_row: k * input.bi * f * b,
            out_plane,
            out_step: b,
            width: ow,
            rows: 1,
            x_rows: stride * input.w * input.bi,
            out_row: ow * b,
            columns,
            chunk_blocks: chunk_blocks(rows_per_task, input.bi),
        };
        let kernel = row_kernel(self.isa, f, job.x_step == b);
        let w_group = self.weights.len() / groups;
        let row_tasks = rows.div_ceil(rows_per_task);
        let tasks_per_image = groups * row_tasks * segments;
        // Where all the weights stay in L2, one thread takes every group of a segment in turn (the segment's
        // input stays in L1), else every segment of a group, of every image (the group's weights stay).
        // Task `t` of image `img`, reading the image's padded input at `x`, writing into `out`.
        // `slot`: the image's place in `out` (0 in a buffer of one image).
        let run = |slot: usize, t: usize, x: *const f32, out: &SendPtr| {
            // A whole capture: `Row` is shared across threads, its pointer fields are not.
            let job = &job;
            let (g, rest) = match weights_stay {
                true => (t % groups, t / groups),
                false => (t / (row_tasks * segments), t % (row_tasks * segments)),
            };
            let (y, s) = (rest / segments * rows_per_task, rest % segments);
            let c0 = s * segment;
            let at = ((slot * groups + g) * f * rows + y) * width * b + c0 * b;
            let row = Row {
                x: x.wrapping_add(y * job.x_rows + c0 * job.x_step),
                w: job.w.wrapping_add(g * w_group),
                bias: job.bias.wrapping_add(g * f * b),
                out: out.0.wrapping_add(at),
                residual: if job.residual.is_null() {
                    job.residual
                } else {
                    job.residual.wrapping_add(at)
                },
                width: segment.min(width - c0),
                rows: rows_per_task.min(rows - y),
                ..*job
            };
            // SAFETY: the pointers address this task's input rows, weights and output segment (`Row`'s bounds
            // are those of the buffers: the padded input holds every tap of every output column), and tasks
            // write disjoint output segments; the kernel set was checked when the op was built.
            unsafe { kernel(&row) };
        };
        let image_out = self.c_out * oh * ow;
        if nchw && input.data().is_none() {
            debug_assert!(residual.is_none());
            let compute = |x: &[f32], out: &SendPtr| {
                for t in 0..tasks_per_image {
                    run(0, t, x.as_ptr(), out);
                }
            };
            // SAFETY: the tasks write every output element of the image.
            let y = unsafe { nchw_image_by_image(&input, (n, image_out, oh * ow * b), b, compute) };
            return Output::Nchw(y);
        }
        let fill = |buf: &mut [MaybeUninit<f32>]| {
            let out = SendPtr(buf.as_mut_ptr().cast::<f32>());
            let out = &out;
            match input.data() {
                Some(x) => {
                    // Neighbouring tasks (the same weights, overlapping input rows) go to one thread in runs
                    // of at least MIN_TASK_FLOPS, so that scheduling stays small beside short rows.
                    let task_flops = 2 * segment * rows_per_task * f * b * self.c_in * k * k;
                    let batch = MIN_TASK_FLOPS.div_ceil(task_flops.max(1));
                    let image = SendPtr(x.as_ptr().cast_mut());
                    let image = &image;
                    parallel::for_each_index(n * tasks_per_image, batch, |task| {
                        let (img, t) = match weights_stay {
                            true => (task / tasks_per_image, task % tasks_per_image),
                            false => {
                                let per_group = row_tasks * segments;
                                let (g, rest) = (task / (n * per_group), task % (n * per_group));
                                (rest / per_group, g * per_group + rest % per_group)
                            }
                        };
                        let x = image.0.wrapping_add(img * input.image_len()).cast_const();
                        run(img, t, x, out)
                    })
                }
                None => each_padded_image(&input, n, |img, x| {
                    for t in 0..tasks_per_image {
                        run(img, t, x.as_ptr(), out);
                    }
                }),
            }
        };
        // SAFETY: the tasks write every element: each (image, block, row) once, all columns.
        if dest == Dest::Values {
            return Output::Values(unsafe { written_by(n * image_out, fill) });
        }
        // SAFETY: as above.
        let data = unsafe { Scratch::written_by(n * image_out, fill) };
        Output::Blocked(Blocked {
            data,
            n,
            c: self.c_out,
            h: oh,
            w: ow,
            lanes: b,
        })
    }
}

/// Output rows per task for `rows` rows of `width` columns (one segment each, tiles of up to `columns`) in
/// `row_groups` (images × output groups × whatever else) independent sets of rows. Short rows of a kernel wider
/// than 1 use each weight vector for few columns: a task then takes several rows, and all their tiles run over one
/// input block's weights while those are in L1 (3×3 × 64 outputs: 37 KB), where one row at a time went over chunks
/// of 64 channels whose weights (147 KB) came from L2 for each tile. Enough tasks stay for the threads. (The sums
/// are the same: the partial sums go through the output, exactly, in the same order.)
pub(super) fn rows_per_task(
    rows: usize,
    width: usize,
    (columns, max_tiles): (usize, usize),
    row_groups: usize,
) -> usize {
    match width <= max_tiles * columns {
        true => {
            let wanted = (4 * rayon::current_num_threads()).div_ceil(row_groups.max(1));
            rows.div_ceil(wanted.max(1))
        }
        false => 1,
    }
}

/// Input blocks of `bi` channels per pass over a task's rows: fewer where it takes several rows, so that their
/// weights stay in L1 across all the rows' tiles.
pub(super) fn chunk_blocks(rows_per_task: usize, bi: usize) -> usize {
    match rows_per_task {
        1 => (CHUNK_CHANNELS / bi).max(1),
        _ => (MULTI_ROW_CHUNK_CHANNELS / bi).max(1),
    }
}

/// `compute(img, x)` for each of the `n` images of `input`, in parallel, `x` the image padded into the thread's
/// buffer: the copy stays in the thread's cache, where a copy of the whole batch goes out to memory and back.
pub(super) fn each_padded_image(input: &Padded, n: usize, compute: impl Fn(usize, &[f32]) + Sync) {
    parallel::for_each_index(n, 1, |img| {
        IMAGE.with_borrow_mut(|buf| {
            // SAFETY: `fill_image` writes all `image_len()` elements.
            let start =
                unsafe { init_aligned(buf, input.image_len(), |dst| input.fill_image(img, dst)) };
            compute(img, &buf[start..]);
        })
    })
}

/// An NCHW output of `n` images of `image_out` values, each made in the thread's cache: image `img` of `input`
/// padded into a per-thread buffer, `compute(x, out)` writing the image's blocked output (planes of `plane`
/// values in blocks of `lanes`) at `out` from the padded image `x`, which then goes to NCHW.
///
/// # Safety
/// `compute` writes all `image_out` values at `out`.
pub(super) unsafe fn nchw_image_by_image(
    input: &Padded,
    (n, image_out, plane): (usize, usize, usize),
    lanes: usize,
    compute: impl Fn(&[f32], &SendPtr) + Sync,
) -> Vec<f32> {
    let fill = |buf: &mut [MaybeUninit<f32>]| {
        for_each_chunk(buf, image_out, |img, dst| {
            IMAGE.with_borrow_mut(|x| {
                OUT_IMAGE.with_borrow_mut(|y| {
                    // SAFETY: `fill_image` writes all `image_len()` elements, `compute` all `image_out`
                    // (the caller's promise).
                    let y_at = unsafe {
                        let x_at = init_aligned(x, input.image_len(), |d| input.fill_image(img, d));
                        init_aligned(y, image_out, |d| {
                            compute(&x[x_at..], &SendPtr(d.as_mut_ptr().cast::<f32>()))
                        })
                    };
                    let blocks = y[y_at..].chunks_exact(plane);
                    for (src, dst) in blocks.zip(dst.chunks_exact_mut(plane)) {
                        block_to_nchw(src, dst, lanes);
                    }
                })
            })
        })
    };
    // SAFETY: every image's chunk is written whole.
    unsafe { written_by(n * image_out, fill) }
}

/// Where [`BlockedConv::compute`] writes its output.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dest {
    /// A pooled [`Blocked`] (inference: freed by the next layers).
    Blocked,
    /// Blocked, in a plain vector (a training tensor's storage).
    Values,
    /// `[N, C, H, W]` where the batch is padded image by image, else a pooled [`Blocked`].
    Nchw,
}

/// What [`BlockedConv::compute`] made.
enum Output {
    Blocked(Blocked),
    /// Blocked values.
    Values(Vec<f32>),
    Nchw(Vec<f32>),
}

#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: tasks write disjoint parts of the buffer (see `forward`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// One task: an output row of one group of blocks of one image.
#[derive(Clone, Copy)]
pub(super) struct Row {
    /// The padded input of the image at block 0, the first input row of this output row, column 0.
    pub(super) x: *const f32,
    /// The group's packed weights.
    pub(super) w: *const f32,
    /// The group's `F·B` biases.
    pub(super) bias: *const f32,
    /// The output at the group's first block, this row, column 0.
    pub(super) out: *mut f32,
    /// The residual at the same place, or null.
    pub(super) residual: *const f32,
    pub(super) relu: bool,
    pub(super) blocks_in: usize,
    pub(super) x_plane: usize,
    pub(super) x_row: usize,
    /// Input elements between output columns: stride · bi.
    pub(super) x_step: usize,
    /// Kernel rows.
    pub(super) kernel: usize,
    /// Kernel columns × input channels per block: the values one kernel row reads per output column.
    pub(super) taps_per_row: usize,
    pub(super) w_plane: usize,
    pub(super) w_row: usize,
    pub(super) out_plane: usize,
    /// Output elements between output columns: `B`, or `stride·B` where a strided layer's input gradient
    /// writes one of its sub-pixel classes (`strided_input_grad`).
    pub(super) out_step: usize,
    pub(super) width: usize,
    /// Output rows of the task (see [`rows_per_task`]), `x_rows` input and `out_row` output elements apart.
    pub(super) rows: usize,
    pub(super) x_rows: usize,
    pub(super) out_row: usize,
    /// Columns per register tile at most.
    pub(super) columns: usize,
    /// Input blocks per pass over the row.
    pub(super) chunk_blocks: usize,
}

// SAFETY: a `Row` is read by one task only; its pointers are into buffers that outlive the parallel loop.
unsafe impl Send for Row {}
unsafe impl Sync for Row {}

pub(super) type RowKernel = unsafe fn(&Row);

/// Accumulators of a register tile: of AVX-512's 32 registers 22 (LLVM spilled a 24-accumulator tile to the
/// stack, a store after every FMA, as its disassembly showed), of AVX2's 16 all but the weight vectors and
/// the broadcast.
pub(super) fn max_columns(isa: Isa, group: usize) -> usize {
    let accumulators = match isa {
        Isa::Avx512 => 22,
        _ => 16 - group - 2,
    };
    (accumulators / group).min(MAX_COLUMNS)
}

/// Output blocks per register tile (`F`) for `blocks` output blocks on `isa`: with AVX-512 four where they
/// divide (4 × 5 columns: 9 loads per 20 FMAs, where 2 × 11 needs 13 per 22), since a core with two FMA units
/// runs out of load slots before FMAs. ResNet-50's blocked forwards at batch 1, all layers but the Winograd ones,
/// each called 15 times in a row (its weights hot): 8.6–8.7 → 7.0–7.1 ms, the 3×3 on 7×7 1.8–2.1 → 1.0–1.2 ms (two
/// alternated runs); the whole net at batch 1 1.04×, at 16 1.068× (6 alternated rounds each, faster in 5; Intel
/// Xeon, 2 FMA units). In the net the last stage's weights (4–9 MB a layer) stream from L3 at batch 1, which bounds
/// those layers whatever the tile.
pub(super) fn output_group(isa: Isa, blocks: usize) -> usize {
    match isa {
        Isa::Avx512 if blocks.is_multiple_of(4) => 4,
        _ if blocks.is_multiple_of(2) => 2,
        _ => 1,
    }
}

/// The row kernel of `isa` for `group` output blocks per tile; `unit_step`: consecutive output columns read
/// consecutive input pixels of `lanes` channels (stride 1, a blocked input), so their offsets are constants.
pub(super) fn row_kernel(isa: Isa, group: usize, unit_step: bool) -> RowKernel {
    macro_rules! pick {
        ($row:ident) => {
            match (group, unit_step) {
                (4, true) => $row::<4, true>,
                (4, false) => $row::<4, false>,
                (2, true) => $row::<2, true>,
                (2, false) => $row::<2, false>,
                (_, true) => $row::<1, true>,
                (_, false) => $row::<1, false>,
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => return pick!(avx512_row),
        Isa::Avx2 => return pick!(avx2_row),
        Isa::Generic => {}
    }
    let _ = isa;
    pick!(portable_row)
}

unsafe fn portable_row<const F: usize, const UNIT: bool>(job: &Row) {
    unsafe { row::<Portable, F, UNIT>(job) }
}

#[cfg(target_arch = "x86_64")]
use x86::{avx2_row, avx512_row};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{row, Row};
    use crate::ops::simd::{Avx2, Avx512};

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_row<const F: usize, const UNIT: bool>(job: &Row) {
        unsafe { row::<Avx2, F, UNIT>(job) }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512_row<const F: usize, const UNIT: bool>(job: &Row) {
        unsafe { row::<Avx512, F, UNIT>(job) }
    }
}

/// The task's rows in tiles of at most `job.columns` columns, as even as possible (7 = 4 + 3, not 6 + 1), over
/// chunks of the input channels: a chunk's input rows and weights stay in L1 across the tiles of all the rows (a
/// 1×1 layer reading 256 channels of a 56×56 plane touches 32 planes 98 KB apart, which alias in L1's sets),
/// and the partial sums go through the output.
#[inline(always)]
unsafe fn row<S: Simd, const F: usize, const UNIT: bool>(job: &Row) {
    let tiles = job.width.div_ceil(job.columns);
    let (base, extra) = (job.width / tiles, job.width % tiles);
    let chunk = job.chunk_blocks;
    for cb in (0..job.blocks_in).step_by(chunk) {
        let pass = Pass {
            blocks: cb..(cb + chunk).min(job.blocks_in),
            first: cb == 0,
            last: cb + chunk >= job.blocks_in,
        };
        for y in 0..job.rows {
            let at = y * job.out_row;
            let job = &Row {
                x: job.x.wrapping_add(y * job.x_rows),
                out: job.out.wrapping_add(at),
                residual: match job.residual.is_null() {
                    true => job.residual,
                    false => job.residual.wrapping_add(at),
                },
                ..*job
            };
            let mut column = 0;
            for t in 0..tiles {
                let r = base + usize::from(t < extra);
                unsafe {
                    match r {
                        1 => tile::<S, F, 1, UNIT>(job, column, &pass),
                        2 => tile::<S, F, 2, UNIT>(job, column, &pass),
                        3 => tile::<S, F, 3, UNIT>(job, column, &pass),
                        4 => tile::<S, F, 4, UNIT>(job, column, &pass),
                        5 => tile::<S, F, 5, UNIT>(job, column, &pass),
                        6 => tile::<S, F, 6, UNIT>(job, column, &pass),
                        7 => tile::<S, F, 7, UNIT>(job, column, &pass),
                        8 => tile::<S, F, 8, UNIT>(job, column, &pass),
                        9 => tile::<S, F, 9, UNIT>(job, column, &pass),
                        10 => tile::<S, F, 10, UNIT>(job, column, &pass),
                        11 => tile::<S, F, 11, UNIT>(job, column, &pass),
                        _ => tile::<S, F, MAX_COLUMNS, UNIT>(job, column, &pass),
                    }
                }
                column += r;
            }
        }
    }
}

/// The input blocks one pass over a row sums, and whether it starts the sums or finishes them.
struct Pass {
    blocks: std::ops::Range<usize>,
    first: bool,
    last: bool,
}

/// `F` blocks × `R` columns from `column` on, for the input blocks of `pass`.
///
/// The column steps are written out (`seq!`, `R` ≤ [`MAX_COLUMNS`]) rather than looped: LLVM unrolls a loop
/// of more than ~12 FMAs only after it has placed the accumulators, so a tile of 7–12 columns × 2 blocks
/// kept them on the stack with a store after every FMA (AVX-512 on AMD Zen 4: half the AVX2 kernel's speed).
// `C` is a literal in each written-out step: `0 * LANES` and `1 * step` read as the column they address.
#[allow(clippy::erasing_op, clippy::identity_op)]
#[inline(always)]
unsafe fn tile<S: Simd, const F: usize, const R: usize, const UNIT: bool>(
    job: &Row,
    column: usize,
    pass: &Pass,
) {
    unsafe {
        let step = if UNIT { S::LANES } else { job.x_step };
        let at = column * job.out_step;
        let mut acc = [[S::zero(); R]; F];
        if !pass.first {
            seq!(C in 0..12 {
                if C < R {
                    for (f, acc) in acc.iter_mut().enumerate() {
                        acc[C] = S::load(job.out.add(at + f * job.out_plane + C * job.out_step));
                    }
                }
            });
        }
        let x0 = job.x.add(column * step);
        for cb in pass.blocks.clone() {
            for ky in 0..job.kernel {
                let x = x0.add(cb * job.x_plane + ky * job.x_row);
                let w = job.w.add(cb * job.w_plane + ky * job.w_row);
                for t in 0..job.taps_per_row {
                    let wv: [S; F] =
                        std::array::from_fn(|f| S::load(w.add((t * F + f) * S::LANES)));
                    seq!(C in 0..12 {
                        if C < R {
                            let xv = S::splat(x.add(C * step + t));
                            for (acc, wv) in acc.iter_mut().zip(&wv) {
                                acc[C] = xv.mul_add(*wv, acc[C]);
                            }
                        }
                    });
                }
            }
        }
        for (f, acc) in acc.iter().enumerate() {
            let bias = S::load(job.bias.add(f * S::LANES));
            seq!(C in 0..12 {
                if C < R {
                    let o = at + f * job.out_plane + C * job.out_step;
                    let mut v = acc[C];
                    if pass.last {
                        v = v.add(bias);
                        if !job.residual.is_null() {
                            v = v.add(S::load(job.residual.add(o)));
                        }
                        if job.relu {
                            v = v.max(S::zero());
                        }
                    }
                    v.store(job.out.add(o));
                }
            });
        }
    }
}
