//! Winograd's forward on channel-blocked tensors (`[N, C/L, H, W, L]`: folded inference, and the forward and
//! stride-1 input gradient of the CIFAR nets' training on blocked tensors), its transforms on whole blocks: each tile value is one vector of the block's L channels, read from and finished into the
//! blocked layout in place. (Transforming plane by plane instead splits every block into its L planes and
//! interleaves the outputs back one value at a time, and vectorises over the tiles of one tile row, which
//! leaves lanes idle on small planes: 4 of 16 on 14×14 with F(4×4).)
//!
//!   V `[T][A²][C_in]` (a tile's values together),  M_ξ = U_ξ · V_ξ stored `[A²][T][C_out]`,  y = Aᵀ M A
//!
//! The transforms make each value by the same operations, in the same order, as the plane-wise ones; the
//! GEMMs read their operands in other layouts, which the GEMM may block and sum in another order, so the two
//! agree to rounding, not necessarily to the bit.

use super::{
    a_times, a_transposed_times, b_transposed_times, images_per_group, transform_lanes,
    weight_grad_sums, with_kept, Buffers, Finish, BUFFERS,
};
use crate::ops::cpu_slice::{each_chunk, kept_prefix};
use crate::ops::gemm::matmul_strided;
use crate::ops::isa::{on_kernel_set, Isa};
use crate::ops::parallel::for_each_chunk;
use gemm::Parallelism;
use std::mem::MaybeUninit;

/// `$body::<A, L>(args)` for blocks of `$lanes` = L channels (8 or 16), compiled for the kernel set `$isa`.
macro_rules! by_lanes {
    ($lanes:expr, $isa:expr, $avx512:ident, $avx2:ident, $body:ident, ($($arg:expr),*)) => {
        match $lanes {
            8 => on_kernel_set!($isa, x86::$avx512::<A, 8>, x86::$avx2::<A, 8>, $body::<A, 8>, ($($arg),*)),
            16 => on_kernel_set!($isa, x86::$avx512::<A, 16>, x86::$avx2::<A, 16>, $body::<A, 16>, ($($arg),*)),
            other => unreachable!("blocks of 8 or 16 channels, not {other}"),
        }
    };
}

/// The sizes of one call: `n` images of `c_in` → `c_out` channels on `h`×`w` planes, in blocks of `lanes`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    lanes: usize,
    /// Tile rows and columns of a plane.
    th: usize,
    tw: usize,
}

impl Dims {
    /// The sizes of `c_in` → `c_out` channels on `h`×`w` planes in blocks of `lanes`, in tiles of `A`×`A`.
    fn new<const A: usize>(
        (c_in, c_out, h, w): (usize, usize, usize, usize),
        lanes: usize,
    ) -> Self {
        let m = A - 2;
        Dims {
            c_in,
            c_out,
            h,
            w,
            lanes,
            th: h.div_ceil(m),
            tw: w.div_ceil(m),
        }
    }

    fn per_image(&self) -> usize {
        self.th * self.tw
    }
}

/// `ReLU?(conv3x3(x, w) + bias (+ residual))` of the blocked `x` into the blocked `y` (every value written),
/// `u` the transformed weights by position ([`weights_by_position`]), the transforms compiled for `isa`, whose
/// blocks are `lanes` wide.
pub(super) fn forward<const A: usize>(
    x: &[f32],
    u: &[f32],
    (n, c_in, c_out, h, w): (usize, usize, usize, usize, usize),
    (isa, lanes): (Isa, usize),
    finish: Finish,
    y: &mut [MaybeUninit<f32>],
) {
    let s = Dims::new::<A>((c_in, c_out, h, w), lanes);
    let group = images_per_group(n, s.per_image());
    let (image_in, image_out) = (c_in * h * w, c_out * h * w);
    if n > group {
        // Groups in parallel, each on one thread.
        for_each_chunk(y, group * image_out, |g, yg| {
            let xg = &x[g * group * image_in..][..yg.len() / image_out * image_in];
            with_kept(&BUFFERS, |buffers| {
                let finish = finish.for_images_from(g * group, image_out);
                run_group::<A>(xg, u, yg, s, buffers, (finish, isa), false);
            })
        });
    } else {
        // One group (a single image): each stage on all threads.
        with_kept(&BUFFERS, |buffers| {
            run_group::<A>(x, u, y, s, buffers, (finish, isa), true)
        });
    }
}

/// The images `xg` of one group into `yg`: their tiles' V, the A² GEMMs, the outputs; each stage on all
/// threads when `parallel`.
fn run_group<const A: usize>(
    xg: &[f32],
    u: &[f32],
    yg: &mut [MaybeUninit<f32>],
    s: Dims,
    Buffers { v, m }: &mut Buffers,
    (finish, isa): (Finish, Isa),
    parallel: bool,
) {
    let (image_in, plane) = (s.c_in * s.h * s.w, s.h * s.w * s.lanes);
    let tiles = xg.len() / image_in * s.per_image();
    // Every value of V and M is written below before it is read.
    let v = kept_prefix(v, tiles * A * A * s.c_in);
    let m = kept_prefix(m, A * A * tiles * s.c_out);
    transform_tiles::<A>(xg, s, v, (isa, false), parallel);
    let v = &*v;
    each_chunk(m, tiles * s.c_out, parallel, |xi, m_xi| {
        // M_ξ = U_ξ · V_ξ, C_out×T stored by tile (column stride C_out), every operand's columns contiguous
        // (a GEMM packs its left operand by columns: U by rows, element by element, took 80 % of the call).
        // U_ξ: C_out×C_in, column stride C_out; V_ξ: C_in×T, element (i, t) at t·A²·C_in + ξ·C_in + i.
        let len = s.c_out * s.c_in;
        matmul_strided(
            (s.c_out, tiles, s.c_in),
            (m_xi, (1, s.c_out)),
            false,
            &u[xi * len..][..len],
            (1, s.c_out),
            &v[xi * s.c_in..],
            (1, A * A * s.c_in),
            Parallelism::None,
        );
    });
    let m = &*m;
    let blocks = s.c_out / s.lanes;
    // One chunk per block of one image: its plane of `lanes`-channel pixels.
    each_chunk(yg, plane, parallel, |k, out| {
        let (j, ob) = (k / blocks, k % blocks);
        let job = OutputPlane {
            products: m,
            tiles,
            s,
            first: j * s.per_image(),
            block: ob,
            bias: &finish.bias[ob * s.lanes..][..s.lanes],
            residual: finish.residual.map(|r| &r[k * plane..][..plane]),
            relu: finish.relu,
        };
        by_lanes!(
            s.lanes,
            isa,
            output_plane_avx512,
            output_plane_avx2,
            output_plane_body,
            (job, out)
        )
    });
}

/// The tiles of every image of `images` (blocked, `s.c_in` channels) into `out` (`[T][A²][C]`), one tile per
/// task; `output_grad`: output-gradient tiles (see [`InputTile`]).
fn transform_tiles<const A: usize>(
    images: &[f32],
    s: Dims,
    out: &mut [f32],
    (isa, output_grad): (Isa, bool),
    parallel: bool,
) {
    let image = s.c_in * s.h * s.w;
    each_chunk(out, A * A * s.c_in, parallel, |t, vt| {
        let (j, k) = (t / s.per_image(), t % s.per_image());
        let job = InputTile {
            x: &images[j * image..][..image],
            s,
            tile: (k / s.tw, k % s.tw),
            output_grad,
        };
        by_lanes!(
            s.lanes,
            isa,
            input_tile_avx512,
            input_tile_avx2,
            input_tile_body,
            (job, vt)
        )
    });
}

/// dU `[A²][C_out][C_in]` of the weight gradient of blocked `x` and `dy` (`lanes` channels per block), summed
/// over the images as the plane-wise `weight_grad_tiles` does (the same chunks of images, one GEMM per
/// position and chunk, in chunk order: the same result for any thread count), the tiles transformed from the
/// blocked layout in place: training on blocked tensors copied both to NCHW first, two passes over each
/// (ResNet-18's 64→64 layers on 56×56 at batch 16: 146–230 GFLOP/s-equivalent against 229–234 on NCHW
/// tensors, Intel Xeon).
pub(super) fn weight_grad_products<const A: usize>(
    x: &[f32],
    dy: &[f32],
    (n, c_in, c_out, h, w): (usize, usize, usize, usize, usize),
    (isa, lanes): (Isa, usize),
) -> Vec<f32> {
    let sx = Dims::new::<A>((c_in, c_out, h, w), lanes);
    let sy = Dims { c_in: c_out, ..sx };
    let sizes = (n, c_in, c_out, h * w);
    weight_grad_sums::<A>((x, dy), sizes, sx.per_image(), |(xc, dyc), tiles, b| {
        transform_tiles::<A>(
            xc,
            sx,
            kept_prefix(&mut b.v, tiles * A * A * c_in),
            (isa, false),
            true,
        );
        transform_tiles::<A>(
            dyc,
            sy,
            kept_prefix(&mut b.m, tiles * A * A * c_out),
            (isa, true),
            true,
        );
        // dM_ξ: C_out×T, element (o, t) at t·A²·C_out + ξ·C_out + o; V_ξ: T×C_in, element (t, i) at
        // t·A²·C_in + ξ·C_in + i.
        [(c_out, (1, A * A * c_out)), (c_in, (A * A * c_in, 1))]
    })
}

/// One tile to transform: the image's blocked input (or output gradient), and the tile's row and column.
struct InputTile<'a> {
    x: &'a [f32],
    /// The image's sizes; `c_in` is the channels of `x`.
    s: Dims,
    tile: (usize, usize),
    /// `x` is an output gradient, transformed for the weight gradient ([`weight_grad_products`]).
    output_grad: bool,
}

/// `Bᵀ d B` of the A×A input tile `d` (zeros past the plane's edge) of every block of channels, into `vt`:
/// value ξ of block `cb` at `ξ·C_in + cb·L`, `L` lanes; of an output gradient, `A dY Aᵀ` of its m×m tile.
#[inline(always)]
fn input_tile_body<const A: usize, const L: usize>(job: InputTile, vt: &mut [f32]) {
    match job.output_grad {
        false => tile_body::<A, L, false>(job, vt),
        true => tile_body::<A, L, true>(job, vt),
    }
}

/// [`input_tile_body`] for an input tile (`GRAD` false) or an output-gradient tile: the same operations as
/// the plane-wise `Transform`s, one vector of `L` channels per value.
#[inline(always)]
fn tile_body<const A: usize, const L: usize, const GRAD: bool>(
    InputTile {
        x,
        s,
        tile: (ty, tx),
        ..
    }: InputTile,
    vt: &mut [f32],
) {
    let m = A - 2;
    // Row and column of the tile's first value: an input tile starts one before its output tile (padding
    // 1), an output-gradient tile on it, m×m values.
    let (shift, side) = if GRAD { (0, m) } else { (1, A) };
    let (y0, x0) = ((m * ty) as isize - shift, (m * tx) as isize - shift);
    let inside = |v: isize, side: usize| (0..side as isize).contains(&v);
    let transform = |line: [f32; A]| match GRAD {
        false => b_transposed_times::<A>(line),
        true => a_times::<A>(line),
    };
    let plane = s.h * s.w * L;
    for (cb, xb) in x.chunks_exact(plane).enumerate() {
        let mut d = [[[0f32; L]; A]; A];
        for (r, row) in d.iter_mut().enumerate().take(side) {
            let iy = y0 + r as isize;
            if !inside(iy, s.h) {
                continue;
            }
            for (c, value) in row.iter_mut().enumerate().take(side) {
                let ix = x0 + c as isize;
                if inside(ix, s.w) {
                    let p = iy as usize * s.w + ix as usize;
                    value.copy_from_slice(&xb[p * L..][..L]);
                }
            }
        }
        // Bᵀ d (or A dY) down each column, then along each row.
        let mut columns = [[[0f32; L]; A]; A];
        for (c, column) in columns.iter_mut().enumerate() {
            *column = transform_lanes::<A, L>(&line(|r| d[r][c]), transform);
        }
        for r in 0..A {
            let row = transform_lanes::<A, L>(&line(|c| columns[c][r]), transform);
            for (c, lanes) in row.iter().enumerate() {
                vt[(r * A + c) * s.c_in + cb * L..][..L].copy_from_slice(lanes);
            }
        }
    }
}

/// The A vectors `value(0..A)`. A loop, not `std::array::from_fn`: LLVM left `from_fn`'s closure out of line,
/// compiled without the caller's target features (SSE code, 6.6 % of ResNet-56 inference in `perf`).
#[inline(always)]
fn line<const A: usize, const L: usize>(value: impl Fn(usize) -> [f32; L]) -> [[f32; L]; A] {
    let mut out = [[0f32; L]; A];
    for (k, lanes) in out.iter_mut().enumerate() {
        *lanes = value(k);
    }
    out
}

/// One output block of one image: the products of its tiles, and how its values are finished.
struct OutputPlane<'a> {
    /// M `[A²][T][C_out]` of the group's T tiles.
    products: &'a [f32],
    tiles: usize,
    s: Dims,
    /// The image's first tile in the group.
    first: usize,
    block: usize,
    bias: &'a [f32],
    /// The residual's plane of this block, blocked.
    residual: Option<&'a [f32]>,
    relu: bool,
}

/// `ReLU?((Aᵀ M A + bias) + residual)` of every tile of the block into its blocked plane `out`.
#[inline(always)]
fn output_plane_body<const A: usize, const L: usize>(
    job: OutputPlane,
    out: &mut [MaybeUninit<f32>],
) {
    let (s, m) = (job.s, A - 2);
    let floor = if job.relu { 0.0 } else { f32::NEG_INFINITY };
    let mut bias = [0f32; L];
    bias.copy_from_slice(&job.bias[..L]);
    for ty in 0..s.th {
        for tx in 0..s.tw {
            let t = job.first + ty * s.tw + tx;
            let at = |xi: usize| (xi * job.tiles + t) * s.c_out + job.block * L;
            // Row r of M times A (m values), then Aᵀ down each of the m columns.
            let mut rows = [[[0f32; L]; A]; A];
            for (r, transformed) in rows.iter_mut().enumerate() {
                let mut row = [[0f32; L]; A];
                for (c, lanes) in row.iter_mut().enumerate() {
                    lanes.copy_from_slice(&job.products[at(r * A + c)..][..L]);
                }
                *transformed = transform_lanes::<A, L>(&row, a_transposed_times::<A>);
            }
            let column =
                |j: usize| transform_lanes::<A, L>(&line(|r| rows[r][j]), a_transposed_times::<A>);
            for (j, column) in (0..m.min(s.w - m * tx)).map(column).enumerate() {
                for (i, lanes) in column.iter().take(m.min(s.h - m * ty)).enumerate() {
                    let p = ((m * ty + i) * s.w + m * tx + j) * L;
                    for l in 0..L {
                        let v = lanes[l] + bias[l];
                        let v = job.residual.map_or(v, |r| v + r[p + l]);
                        out[p + l].write(v.max(floor));
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{input_tile_body, output_plane_body, InputTile, OutputPlane};
    use std::mem::MaybeUninit;

    /// Entry points that compile the transforms with `$features`.
    macro_rules! entries {
        ($input:ident, $output:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $input<const A: usize, const L: usize>(
                job: InputTile,
                vt: &mut [f32],
            ) {
                input_tile_body::<A, L>(job, vt)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $output<const A: usize, const L: usize>(
                job: OutputPlane,
                out: &mut [MaybeUninit<f32>],
            ) {
                output_plane_body::<A, L>(job, out)
            }
        };
    }
    entries!(input_tile_avx2, output_plane_avx2, "avx2");
    entries!(input_tile_avx512, output_plane_avx512, "avx512f");
}
