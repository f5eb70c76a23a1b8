//! Winograd F(m×m, 3×3) convolution (Lavin & Gray, 2016) for the wide 3×3, stride-1, padding-1 layers, with
//! two output tiles ([`Tile`]): F(2×2, 3×3) takes 16 multiplies per 2×2 output tile and channel pair instead
//! of 36 (2.25× fewer), F(4×4, 3×3) 36 per 4×4 tile instead of 144 (4×). Each is (m+2)² GEMMs of the transformed
//! weights with the transformed input tiles (the `gemm` crate), between cheap linear transforms. Used for the
//! forward pass and the input gradient (the same convolution of the output gradient with the kernel flipped and
//! its channel axes swapped), on NCHW data, and for folded inference's forward on the channel-blocked layout
//! with the bias, residual and ReLU applied as the outputs are stored (`forward_blocked`, whose transforms
//! take whole channel blocks: module `blocked`), and for the weight
//! gradient (`weight_grad`). Narrow layers, whose transforms would cost as much as the products, stay direct.
//!
//!   U = G g Gᵀ (weights),  V = Bᵀ d B (input tiles),  M_ξ = U_ξ · V_ξ (ξ < (m+2)²),  y = Aᵀ M A (m×m)
//!
//! The functions below are generic over `A` = m + 2, the input tile's side (4 or 6).

use crate::ops::cpu_slice::{each_chunk, written_by};
use crate::ops::gemm::matmul;
use crate::ops::isa::Isa;
use crate::ops::parallel::{self, for_each_chunk};
use crate::ops::taps::kernel_3x3;
use gemm::Parallelism;
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::thread::LocalKey;

/// The output tile of Winograd's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// F(2×2, 3×3): 4×4 input tiles, 16 GEMMs.
    F2,
    /// F(4×4, 3×3): 6×6 input tiles, 36 GEMMs; transforms with factors up to 8 (Aᵀ) and 1/24 (G), so it
    /// rounds more than F(2×2): a weight gradient summed over 40 images of 300 channels differed from candle's
    /// by ~1e-5 of its largest value, F(2×2)'s by ~1e-6 (the PyTorch fixtures allow 1e-3 of the norm).
    F4,
}

impl Tile {
    /// The tile for an `h`×`w` plane: F(4×4) on planes of 24×24 and larger, F(2×2) on smaller ones, where
    /// 4×4 tiles cover much padding or too few tiles fill the GEMMs. Forward at batch 16, GFLOP/s-equivalent,
    /// F(2×2) / F(4×4), 3 alternated rounds (AMD EPYC Zen 4, 2 threads): 64→64 on 56×56 233–255 / 365–383,
    /// 128→128 on 28×28 297 / 306–333 (two rounds in a slow phase of the VM: 181 / 195, 183 / 306), 256→256
    /// on 14×14 264–275 / 253–262, 512→512 on 7×7 127–195 / 86–115.
    pub fn for_plane((h, w): (usize, usize)) -> Tile {
        if h.min(w) >= 24 {
            Tile::F4
        } else {
            Tile::F2
        }
    }

    /// The tile of the NCHW forward (and input gradient) over `n` images: [`Tile::for_plane`]'s, but F(4×4) on
    /// a single image from 14×14 up, where F(2×2) does not run (see [`applies`]): its 16 tiles in 4×4 cover
    /// 14×14 with 23 % padding, still ~3× fewer multiplies than the direct kernel. ResNet-50 inference at
    /// batch 1 when the blocked forward still ran these plane-wise transforms (its five 256→256 layers on 14×14
    /// from the direct kernel to F(4×4)): faster in 6 of 6 alternated runs, 21.6–23.5 → 23.6–25.9 img/s (AMD
    /// EPYC Zen 4, 2 threads).
    pub fn for_layer(n: usize, (h, w): (usize, usize)) -> Tile {
        match h.min(w) {
            14.. if n == 1 => Tile::F4,
            _ => Tile::for_plane((h, w)),
        }
    }

    /// The tile of the blocked forward ([`forward_blocked`]), whose transforms take whole channel blocks and
    /// cost little on any plane: F(4×4) from 8×8 up (an 8×8 plane is 2×2 tiles exactly), F(2×2) below. In
    /// `bench --convs`, blocked inference forward, GFLOP/s-equivalent, direct / F(2×2) / F(4×4) (AMD EPYC
    /// Zen 4, 2 threads, two runs each): ResNet-50 at batch 16, 256→256 on 14×14 – / 291–297 / 358–405; at
    /// batch 1, 512→512 on 7×7 185–196 / 162–169 / 119–120 (4 tiles); CIFAR ResNet-56 at batch 500, 32→32
    /// on 16×16 212 / 157 / 223–248, 64→64 on 8×8 216 / 244–258 / 353–373, 16→16 on 32×32 201 / – / 150.
    pub fn for_blocked((h, w): (usize, usize)) -> Tile {
        if h.min(w) >= 8 {
            Tile::F4
        } else {
            Tile::F2
        }
    }

    /// The fewest channels of the blocked forward's tile (see [`Tile::for_blocked`]): F(4×4) wins from 32.
    fn min_blocked_channels(self) -> usize {
        match self {
            Tile::F2 => 128,
            Tile::F4 => 32,
        }
    }

    /// The fewest channels (in and out) from which the tile beats the direct kernel: F(4×4)'s products are
    /// cheap enough at 64 (the direct kernel runs ResNet-18's 64→64 layers at ~190); at 16 and 32 channels
    /// (CIFAR) neither wins (32→32 on 16×16 at batch 128: 103–105 / 111–146).
    fn min_channels(self) -> usize {
        match self {
            Tile::F2 => 128,
            Tile::F4 => 64,
        }
    }

    /// Output pixels per tile side.
    fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }
}

/// `f::<A>(args)` for the input tile side `A` of `tile`.
macro_rules! by_tile {
    ($tile:expr, $($f:ident)::+($($arg:expr),* $(,)?)) => {
        match $tile {
            Tile::F2 => $($f)::+::<4>($($arg),*),
            Tile::F4 => $($f)::+::<6>($($arg),*),
        }
    };
}

use crate::ops::isa::on_kernel_set;

mod blocked;

/// Whether the Winograd path runs a 3×3/stride-1/padding-1 convolution of `c_in` → `c_out` channels over
/// `n` images of `h`×`w`: layers of at least [`Tile::min_channels`], whose GEMMs get at least 48 tiles (a group
/// of images, see [`images_per_group`]: 512→512 on 7×7 at batch 16, eight images per GEMM, ~200 vs ~155 by
/// im2col + GEMM; one 7×7 image alone (16 tiles) ~60). A single image runs each stage on all threads: with
/// F(4×4) tiles on 56×56 and 28×28 planes that wins (64→64 on 56×56 at 168–265 GFLOP/s-equivalent; see
/// [`MIN_GEMM_TILES`] for ResNet-50), with F(2×2) on 14×14 not (256→256 ~150, the direct
/// kernel ~200), so F(2×2) takes two images or more and one image of 14×14 to 23×23 runs F(4×4) (see
/// [`Tile::for_layer`]; on 7×7 nothing wins alone). Never the thread count: the result must not depend on it.
pub fn applies(n: usize, (c_in, c_out): (usize, usize), (h, w): (usize, usize)) -> bool {
    let tile = Tile::for_layer(n, (h, w));
    let tiles = Tiles::new(h, w, tile).count();
    c_in.min(c_out) >= tile.min_channels()
        && match n {
            1 => tile == Tile::F4,
            _ => images_per_group(n, tiles) * tiles >= MIN_GEMM_TILES,
        }
}

/// Whether [`forward_blocked`] runs a 3×3/stride-1/padding-1 convolution of `c_in` → `c_out` channels over `n`
/// blocked images of `h`×`w`, by the tile of [`Tile::for_blocked`]: layers of at least
/// [`Tile::min_blocked_channels`], with GEMMs of at least 48 tiles (as [`applies`]) or a single image of 16
/// F(4×4) tiles or more (14×14 and up; one 7×7 image ran at 162–169 GFLOP/s-equivalent with F(2×2)'s 16 tiles,
/// 119 with F(4×4)'s 4, the direct kernel at 185–196).
pub fn blocked_applies(n: usize, (c_in, c_out): (usize, usize), (h, w): (usize, usize)) -> bool {
    let tile = Tile::for_blocked((h, w));
    let tiles = Tiles::new(h, w, tile).count();
    c_in.min(c_out) >= tile.min_blocked_channels()
        && match n {
            1 => tile == Tile::F4 && tiles >= 16,
            _ => images_per_group(n, tiles) * tiles >= MIN_GEMM_TILES,
        }
}

/// Whether [`weight_grad`] runs: layers of at least [`Tile::min_channels`] with enough tiles (as [`applies`],
/// a single image included: its GEMMs' depth is every tile of the batch). ResNet-18's layers at batch 16,
/// GFLOP/s-equivalent, F(2×2) / F(4×4) (2 alternated rounds, AMD EPYC Zen 4): 64→64 on 56×56 181–185 / 241–242
/// (the blocked direct kernel ~195–220 in `bench --convs`); 128→128 on 28×28 250–258 / 329–331; 256→256 on
/// 14×14 203–237 / 190–201. On 7×7, where F(2×2)'s tiles cover 8×8, the blocked kernel / F(2×2): 173–194 /
/// 188–208 (`bench --convs`, 3 alternated rounds, faster in 3).
pub fn weight_grad_applies(
    n: usize,
    (c_in, c_out): (usize, usize),
    (h, w): (usize, usize),
) -> bool {
    let tile = Tile::for_plane((h, w));
    let tiles = Tiles::new(h, w, tile).count();
    c_in.min(c_out) >= tile.min_channels() && images_per_group(n, tiles) * tiles >= MIN_GEMM_TILES
}

/// Tiles per GEMM from which Winograd's algorithm wins: 48 lets in one 28×28 image's 49 F(4×4) tiles (and at
/// two images, groups of one 14×14 image's 49 F(2×2) ones), which 64 did not: ResNet-50 at batch 1 ran 1.04×
/// faster (median of 8 alternated runs, faster in 6), at batch 2 1.05× (6 runs, faster in 5).
const MIN_GEMM_TILES: usize = 48;

/// `y = conv3x3(x, w)` (`n·c_out·h·w` values), by the tiles of [`Tile::for_layer`].
pub fn forward(x: &[f32], w: &[f32], dims: (usize, usize, usize, usize, usize)) -> Vec<f32> {
    convolve(default_kernels(dims), x, w, dims, false)
}

/// `dx` of `y = conv3x3(x, w)` from `dy`: `conv3x3(dy, w')`, `w'[ci, co, ky, kx] = w[co, ci, 2−ky, 2−kx]`.
pub fn input_grad(dy: &[f32], w: &[f32], dims: (usize, usize, usize, usize, usize)) -> Vec<f32> {
    convolve(default_kernels(dims), dy, w, dims, true)
}

/// The tile for the plane of `dims` (`(n, c_in, c_out, h, w)`), and the kernel set in use.
fn default_kernels(dims: (usize, usize, usize, usize, usize)) -> (Tile, Isa) {
    (Tile::for_layer(dims.0, (dims.3, dims.4)), Isa::current())
}

/// `conv3x3(x, w)` by `tile`, the transforms compiled for `isa`; `flipped`: `conv3x3(dy, w')` of
/// [`input_grad`] (from `c_out` to `c_in` channels) instead.
fn convolve(
    (tile, isa): (Tile, Isa),
    x: &[f32],
    w: &[f32],
    (n, c_in, c_out, h, wd): (usize, usize, usize, usize, usize),
    flipped: bool,
) -> Vec<f32> {
    let u = by_tile!(tile, transform_weights(w, (c_out, c_in), flipped));
    let (from, to) = if flipped {
        (c_out, c_in)
    } else {
        (c_in, c_out)
    };
    run(x, &u, (tile, isa), (n, from, to, h, wd))
}

/// `U[o][ξ][i] = (G g Gᵀ)[ξ]` for every kernel `g` of `w` `[C_out, C_in, 3, 3]`, by output channel on all
/// threads; `transposed` transforms `w'` of [`input_grad`] instead (o and i swapped, taps flipped). U_ξ is
/// then the `outs`×`ins` matrix at offset ξ·ins with row stride A²·ins.
fn transform_weights<const A: usize>(
    w: &[f32],
    (c_out, c_in): (usize, usize),
    transposed: bool,
) -> Vec<f32> {
    let (outs, ins) = if transposed {
        (c_in, c_out)
    } else {
        (c_out, c_in)
    };
    let isa = Isa::current();
    let fill = |u: &mut [MaybeUninit<f32>]| {
        for_each_chunk(u, A * A * ins, |o, uo| {
            let job = KernelsTo {
                w,
                c_in,
                transposed,
                o,
            };
            transform_kernels::<A>(isa, job, uo)
        })
    };
    // SAFETY: every (ξ, i) of every output channel's chunk is written by `weights_body`.
    unsafe { written_by(outs * A * A * ins, fill) }
}

/// [`weights_body`] compiled for the kernel set `isa`.
fn transform_kernels<const A: usize>(isa: Isa, job: KernelsTo, uo: &mut [MaybeUninit<f32>]) {
    on_kernel_set!(
        isa,
        x86::weights_avx512::<A>,
        x86::weights_avx2::<A>,
        weights_body::<A>,
        (job, uo)
    )
}

/// The kernels of `w` (`[C_out, C_in, 3, 3]`, or the transposed ones of [`input_grad`]) into output channel `o`,
/// for [`transform_weights`].
struct KernelsTo<'a> {
    w: &'a [f32],
    c_in: usize,
    transposed: bool,
    o: usize,
}

/// `U[o][ξ][i]` for the kernels of `job` into `uo` (output channel o's `A²·ins` values), LANES kernels side by
/// side: each lane computes exactly what one kernel alone did (the same operations, so the same values on every
/// kernel set), and the stores of a ξ are one contiguous run. Scalar, kernel by kernel, these transforms took
/// ~15 % of a 512→512 forward on 7×7 planes at batch 16.
#[inline(always)]
fn weights_body<const A: usize>(job: KernelsTo, uo: &mut [MaybeUninit<f32>]) {
    let ins = uo.len() / (A * A);
    for i0 in (0..ins).step_by(LANES) {
        weight_lanes::<A>(&job, i0..ins.min(i0 + LANES), uo);
    }
}

/// [`weights_body`] for the LANES kernels (at most) from input channels `inputs`.
#[inline(always)]
fn weight_lanes<const A: usize>(
    &KernelsTo {
        w,
        c_in,
        transposed,
        o,
    }: &KernelsTo,
    inputs: std::ops::Range<usize>,
    uo: &mut [MaybeUninit<f32>],
) {
    let ins = uo.len() / (A * A);
    let mut taps = [[0f32; LANES]; 9];
    for (l, i) in inputs.clone().enumerate() {
        for (t, v) in kernel_3x3(w, c_in, transposed, (o, i))
            .into_iter()
            .enumerate()
        {
            taps[t][l] = v;
        }
    }
    // G g (A×3), column by column, then (G g) Gᵀ row by row; lane by lane, in place (whole arrays returned
    // by value went through `memcpy`).
    let mut cols = [[[0f32; LANES]; A]; 3];
    for (c, col) in cols.iter_mut().enumerate() {
        for l in 0..LANES {
            let g = g_times::<A>([taps[c][l], taps[3 + c][l], taps[6 + c][l]]);
            for (r, v) in g.into_iter().enumerate() {
                col[r][l] = v;
            }
        }
    }
    let len = inputs.len();
    let mut row = [[0f32; LANES]; A];
    for r in 0..A {
        for l in 0..LANES {
            let g = g_times::<A>([cols[0][r][l], cols[1][r][l], cols[2][r][l]]);
            for (c, v) in g.into_iter().enumerate() {
                row[c][l] = v;
            }
        }
        for (c, lanes) in row.iter().enumerate() {
            let dst = &mut uo[(r * A + c) * ins + inputs.start..][..len];
            for (d, v) in dst.iter_mut().zip(lanes) {
                d.write(*v);
            }
        }
    }
}

/// `G·[a, b, d]`: F(2×2) G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]; F(4×4) (points 0, ±1, ±2)
/// G = [[¼, 0, 0], [−⅙, −⅙, −⅙], [−⅙, ⅙, −⅙], [1/24, 1/12, ⅙], [1/24, −1/12, ⅙], [0, 0, 1]].
#[inline(always)]
fn g_times<const A: usize>([a, b, d]: [f32; 3]) -> [f32; A] {
    let mut o = [0f32; A];
    if A == 4 {
        o[..4].copy_from_slice(&[a, 0.5 * (a + b + d), 0.5 * (a - b + d), d]);
    } else {
        let (sum, alt) = (a + d, b);
        o[..6].copy_from_slice(&[
            0.25 * a,
            -(sum + alt) / 6.0,
            -(sum - alt) / 6.0,
            (a + 2.0 * b + 4.0 * d) / 24.0,
            (a - 2.0 * b + 4.0 * d) / 24.0,
            d,
        ]);
    }
    o
}

/// `Gᵀ·d` (3 values) for the G of [`g_times`].
#[inline(always)]
fn g_transposed_times<const A: usize>(d: [f32; A]) -> [f32; 3] {
    if A == 4 {
        [
            d[0] + 0.5 * (d[1] + d[2]),
            0.5 * (d[1] - d[2]),
            0.5 * (d[1] + d[2]) + d[3],
        ]
    } else {
        [
            0.25 * d[0] - (d[1] + d[2]) / 6.0 + (d[3] + d[4]) / 24.0,
            (d[2] - d[1]) / 6.0 + (d[3] - d[4]) / 12.0,
            (d[3] + d[4] - d[1] - d[2]) / 6.0 + d[5],
        ]
    }
}

/// `Bᵀ·d` for one line `d` of an input tile: F(2×2) Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0],
/// [0, 1, 0, −1]]; F(4×4) Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0],
/// [0, −2, −1, 2, 1, 0], [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]].
#[inline(always)]
fn b_transposed_times<const A: usize>(d: [f32; A]) -> [f32; A] {
    let mut o = [0f32; A];
    if A == 4 {
        o[..4].copy_from_slice(&[d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]);
    } else {
        o[..6].copy_from_slice(&[
            4.0 * d[0] - 5.0 * d[2] + d[4],
            d[3] + d[4] - 4.0 * (d[1] + d[2]),
            4.0 * (d[1] - d[2]) + d[4] - d[3],
            2.0 * (d[3] - d[1]) + d[4] - d[2],
            2.0 * (d[1] - d[3]) + d[4] - d[2],
            4.0 * d[1] - 5.0 * d[3] + d[5],
        ]);
    }
    o
}

/// `Aᵀ·s` for one line `s` of a product tile (the first m values): F(2×2) Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]];
/// F(4×4) Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0], [0, 1, −1, 8, −8, 1]].
#[inline(always)]
fn a_transposed_times<const A: usize>(s: [f32; A]) -> [f32; A] {
    let mut o = [0f32; A];
    if A == 4 {
        o[..2].copy_from_slice(&[s[0] + s[1] + s[2], s[1] - s[2] - s[3]]);
    } else {
        let (p, q) = (s[1] + s[2], s[1] - s[2]);
        let (p2, q2) = (s[3] + s[4], s[3] - s[4]);
        o[..4].copy_from_slice(&[
            s[0] + p + p2,
            q + 2.0 * q2,
            p + 4.0 * p2,
            q + 8.0 * q2 + s[5],
        ]);
    }
    o
}

/// `A·v` for m values `v` (the first m of the array): the transpose of [`a_transposed_times`].
#[inline(always)]
fn a_times<const A: usize>(v: [f32; A]) -> [f32; A] {
    let mut o = [0f32; A];
    if A == 4 {
        o[..4].copy_from_slice(&[v[0], v[0] + v[1], v[0] - v[1], -v[1]]);
    } else {
        let (even, odd) = (v[0] + v[2], v[1] + v[3]);
        let (even4, odd2) = (v[0] + 4.0 * v[2], 2.0 * v[1] + 8.0 * v[3]);
        o[..6].copy_from_slice(&[
            v[0],
            even + odd,
            even - odd,
            even4 + odd2,
            even4 - odd2,
            v[3],
        ]);
    }
    o
}

thread_local! {
    /// A task's transformed kernels on their way to U by position (`transform_weights_by_position`).
    static BY_POSITION: RefCell<Vec<MaybeUninit<f32>>> = const { RefCell::new(Vec::new()) };
    /// Per group of images: transformed input tiles V `[C_in][A²][T]` and products M `[A²][C_out][T]`.
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
    /// Per weight gradient: V and dM of a chunk of images (a nested call on the same thread makes its own).
    static WEIGHT_GRAD_BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
    /// Per thread: one zero-bordered input plane and the row transforms of one tile row.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Buffers {
    v: Vec<f32>,
    m: Vec<f32>,
}

/// `f` of this thread's buffers in `key`, kept from call to call (fresh ones were page-faulted in on every
/// call: a single image's forward ran at half the speed); of new ones where they are in use further up this
/// thread's stack (a call nested in another's wait for its parallel work), instead of a panic.
fn with_kept<R>(key: &'static LocalKey<RefCell<Buffers>>, f: impl FnOnce(&mut Buffers) -> R) -> R {
    key.with(|b| match b.try_borrow_mut() {
        Ok(mut kept) => f(&mut kept),
        Err(_) => f(&mut Buffers::default()),
    })
}

#[derive(Default)]
struct Scratch {
    plane: Vec<f32>,
    rows: Vec<f32>,
}

/// Tile geometry of one plane: `th`×`tw` tiles of m×m outputs; the padded plane is `(m·th + 2)`×`(m·tw + 2)`,
/// image at (1, 1), kept split by column phase: padded row y holds m phases of [`Tiles::phase_len`] values,
/// column x = m·j + p at `p·phase_len + j`, so that the columns that tiles tx, tx + 1, … read at one offset
/// in their tile are contiguous.
#[derive(Clone, Copy)]
struct Tiles {
    h: usize,
    w: usize,
    m: usize,
    th: usize,
    tw: usize,
}

impl Tiles {
    fn new(h: usize, w: usize, tile: Tile) -> Self {
        let m = tile.m();
        Self {
            h,
            w,
            m,
            th: h.div_ceil(m),
            tw: w.div_ceil(m),
        }
    }

    fn count(&self) -> usize {
        self.th * self.tw
    }

    /// Values per phase of a padded row: the tw + 1 columns of the phase, rounded up to whole chunks.
    fn phase_len(&self) -> usize {
        (self.tw + 1).next_multiple_of(LANES)
    }

    /// Values per padded row (all its phases).
    fn row_len(&self) -> usize {
        self.m * self.phase_len()
    }

    /// The padded plane and LANES values of slack (read past the last row by whole chunks).
    fn padded_len(&self) -> usize {
        (self.m * self.th + 2) * self.row_len() + LANES
    }

    /// The row transforms of one tile row (A padded rows' worth) and the slack read past them.
    fn rows_len(&self, a: usize) -> usize {
        a * self.row_len() + LANES + 1
    }
}

/// Images per group: the A² GEMMs of a group run over the tiles of all its images, so that small planes still
/// give long GEMMs (a 7×7 plane has 16 tiles; alone, its GEMMs ran at ~125–150 GFLOP/s, eight at a time at
/// ~200). About 128 tiles, no more: larger groups' V and M outgrow the cache (28×28 by twos: 195 vs 245); and
/// at least two groups, for the threads. A function of the shape alone: each GEMM column is one tile,
/// computed the same way whatever the group.
fn images_per_group(n: usize, tiles: usize) -> usize {
    128usize.div_ceil(tiles).min(n / 2).max(1)
}

/// What a blocked output is finished with as it is stored: `ReLU?((y + bias[c]) + residual)`, the roundings of
/// the direct blocked kernel's epilogue.
#[derive(Debug, Clone, Copy)]
pub struct Finish<'a> {
    pub bias: &'a [f32],
    pub relu: bool,
    /// Shaped as the output, in its layout.
    pub residual: Option<&'a [f32]>,
}

impl<'a> Finish<'a> {
    /// The finish of the images from `first` on, each `image_out` output values (the residual moves with them).
    fn for_images_from(self, first: usize, image_out: usize) -> Finish<'a> {
        Finish {
            residual: self.residual.map(|r| &r[first * image_out..]),
            ..self
        }
    }
}

/// The transformed weights U of `conv3x3(·, w)`, `w` `[C_out, C_in, 3, 3]`, for [`forward_blocked`] with `tile`.
pub fn forward_weights(w: &[f32], (c_out, c_in): (usize, usize), tile: Tile) -> Vec<f32> {
    by_tile!(tile, transform_weights_by_position(w, (c_out, c_in), false))
}

/// The transformed weights of the input gradient's `conv3x3(dy, w')` (`w'[ci, co] = w[co, ci]` flipped, from
/// `c_out` to `c_in` channels), for [`forward_blocked`] with `tile`, straight from `w` `[C_out, C_in, 3, 3]`.
pub fn input_grad_weights(w: &[f32], (c_out, c_in): (usize, usize), tile: Tile) -> Vec<f32> {
    by_tile!(tile, transform_weights_by_position(w, (c_out, c_in), true))
}

/// Output channels per task of [`transform_weights_by_position`]: a 64-byte line of each destination row.
const BY_POSITION_OUTPUTS: usize = 16;

/// U by position, `[A²][C_in][C_out]` (each U_ξ with its output channels contiguous, as the blocked forward's
/// GEMMs read it), straight from `w`: each task transforms the kernels of 16 output channels into a buffer of
/// its own (`weights_body`, U's `[C_out][A²][C_in]` order) and writes them out as 16-value runs of each row.
/// Transforming all of U first and reordering it after went over three U-sized buffers (512→512: 17 MB each);
/// the blocked training ops transform their weights on every call.
fn transform_weights_by_position<const A: usize>(
    w: &[f32],
    (c_out, c_in): (usize, usize),
    transposed: bool,
) -> Vec<f32> {
    let isa = Isa::current();
    // The transposed kernels (see `transform_weights`) go from `c_out` to `c_in` channels.
    let (outs, ins) = match transposed {
        false => (c_out, c_in),
        true => (c_in, c_out),
    };
    let per_output = A * A * ins;
    let fill = |u: &mut [MaybeUninit<f32>]| {
        // Each task writes the columns of its own output channels only: disjoint elements of `u`.
        let base = u.as_mut_ptr() as usize;
        parallel::for_each_index(outs.div_ceil(BY_POSITION_OUTPUTS), 1, |b| {
            BY_POSITION.with_borrow_mut(|local| {
                let outputs = b * BY_POSITION_OUTPUTS..outs.min((b + 1) * BY_POSITION_OUTPUTS);
                local.resize(outputs.len() * per_output, MaybeUninit::uninit());
                for (uo, o) in local.chunks_exact_mut(per_output).zip(outputs.clone()) {
                    let job = KernelsTo {
                        w,
                        c_in,
                        transposed,
                        o,
                    };
                    transform_kernels::<A>(isa, job, uo);
                }
                for row in 0..per_output {
                    // SAFETY: row `row` (position ξ, input channel i) of U by position starts at
                    // `row·outs`; this task alone writes its columns `outputs`, all inside `u`.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            (base as *mut MaybeUninit<f32>).add(row * outs + outputs.start),
                            outputs.len(),
                        )
                    };
                    for (d, uo) in dst.iter_mut().zip(local.chunks_exact(per_output)) {
                        *d = uo[row];
                    }
                }
            })
        });
    };
    // SAFETY: every (ξ, i, o) is written: `weights_body` writes each output channel's buffer whole.
    unsafe { written_by(A * A * ins * outs, fill) }
}

/// `ReLU?(conv3x3(x, w) + bias (+ residual))` of a blocked `x` (`[N, C_in/B, H, W, B]`) into the blocked output
/// `y` (every value written), with `u` = [`forward_weights`] of `w` for `tile`, the transforms compiled for
/// `isa`. Channels in whole blocks of `lanes`.
pub fn forward_blocked(
    x: &[f32],
    (u, tile, isa): (&[f32], Tile, Isa),
    dims: (usize, usize, usize, usize, usize),
    lanes: usize,
    finish: Finish,
    y: &mut [MaybeUninit<f32>],
) {
    match tile {
        Tile::F2 => blocked::forward::<4>(x, u, dims, (isa, lanes), finish, y),
        Tile::F4 => blocked::forward::<6>(x, u, dims, (isa, lanes), finish, y),
    }
}

fn run(
    x: &[f32],
    u: &[f32],
    (tile, isa): (Tile, Isa),
    dims: (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let (n, _, c_out, h, wd) = dims;
    // SAFETY: `run_into` writes every value of y.
    unsafe {
        written_by(n * c_out * h * wd, |y| {
            by_tile!(tile, run_into(x, u, dims, isa, y))
        })
    }
}

/// The convolution of the NCHW `x` into `y`, every value of `y` written, the transforms compiled for `isa`.
fn run_into<const A: usize>(
    x: &[f32],
    u: &[f32],
    (n, c_in, c_out, h, wd): (usize, usize, usize, usize, usize),
    isa: Isa,
    y: &mut [MaybeUninit<f32>],
) {
    let t = Tiles::new(h, wd, tile_of::<A>());
    let group = images_per_group(n, t.count());
    let dims = (c_in, c_out, h, wd);
    let group_out = group * c_out * h * wd;
    if n > group {
        // Groups in parallel, each on one thread.
        let group_in = group * c_in * h * wd;
        for_each_chunk(y, group_out, |g, yg| {
            let images = yg.len() / (c_out * h * wd);
            let xg = &x[g * group_in..][..images * c_in * h * wd];
            with_kept(&BUFFERS, |Buffers { v, m }| {
                run_group::<A>(xg, u, yg, dims, &t, (v, m), isa, false);
            })
        });
    } else {
        // One group (a single image): each stage on all threads.
        with_kept(&BUFFERS, |Buffers { v, m }| {
            run_group::<A>(x, u, y, dims, &t, (v, m), isa, true)
        });
    }
}

/// The images `xg` of one group into their outputs `yg`: V `[C_in][A²][T]` and M `[A²][C_out][T]` over the
/// group's T tiles (image by image), the transforms by channel and the A² GEMMs, each stage on all threads
/// when `parallel`.
#[allow(clippy::too_many_arguments)]
fn run_group<const A: usize>(
    xg: &[f32],
    u: &[f32],
    yg: &mut [MaybeUninit<f32>],
    (c_in, c_out, h, wd): (usize, usize, usize, usize),
    t: &Tiles,
    (v, m): (&mut Vec<f32>, &mut Vec<f32>),
    isa: Isa,
    parallel: bool,
) {
    let (plane, per_image) = (h * wd, t.count());
    let images = xg.len() / (c_in * plane);
    let (tiles, stride) = (images * per_image, tile_stride(images * per_image));
    // LANES values of slack: `output_tiles` reads whole chunks.
    m.resize(A * A * c_out * tiles + LANES, 0.0);
    transform_inputs::<A>(xg, (c_in, h, wd), t, v, isa, parallel, Transform::Input);
    let v = &*v;
    each_chunk(
        &mut m[..A * A * c_out * tiles],
        c_out * tiles,
        parallel,
        |xi_pos, m_xi| {
            // U_ξ: c_out×c_in with row stride A²·c_in; V_ξ: c_in×T with row stride A²·stride; M_ξ row-major.
            matmul(
                (c_out, tiles, c_in),
                m_xi,
                false,
                &u[xi_pos * c_in..],
                (A * A * c_in, 1),
                &v[xi_pos * stride..],
                (A * A * stride, 1),
                Parallelism::None,
            );
        },
    );
    let m = &*m;
    // One chunk per output plane.
    each_chunk(yg, plane, parallel, |k, out| {
        let (j, c) = (k / c_out, k % c_out);
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            let z_len = (A - 2) * (A - 2) * per_image.next_multiple_of(LANES);
            s.rows.resize(s.rows.len().max(z_len), 0.0);
            let job = Products {
                products: m,
                at: (c * tiles + j * per_image, c_out * tiles),
                t,
                z: &mut s.rows[..],
            };
            output_tiles::<A, _>(isa, job, |p, y| {
                out[p].write(y);
            });
        })
    });
}

/// How a plane's tiles are transformed.
#[derive(Clone, Copy)]
enum Transform {
    /// The input tiles of a convolution: `Bᵀ d B` of the A×A tiles of the zero-bordered plane.
    Input,
    /// The output-gradient tiles of the weight gradient: `A dY Aᵀ` of the m×m tiles of the plane, zeros past
    /// its edge.
    OutputGrad,
}

impl Transform {
    /// Where pixel (0, 0) lies in the padded plane.
    fn shift(self) -> usize {
        match self {
            Transform::Input => 1,
            Transform::OutputGrad => 0,
        }
    }
}

/// [`split_phases`] compiled for `isa`.
fn split_row<const M: usize>(isa: Isa, line: &[f32], row: &mut [f32], t: &Tiles, shift: usize) {
    on_kernel_set!(
        isa,
        x86::split_phases_avx512::<M>,
        x86::split_phases_avx2::<M>,
        split_phases::<M>,
        (line, row, t, shift)
    )
}

/// Image row `line` into its padded row `row` of `M` phases: image column c is padded column c + shift, which
/// lies in phase (c + shift) mod M at (c + shift) / M. The columns of whole groups of M go a
/// phase at a time with M a constant, compiled for the kernel set (`split_row`), which LLVM vectorises; with
/// the group size a variable it was a scalar gather (~5 % of a ResNet-18 training step in `perf`).
#[inline(always)]
fn split_phases<const M: usize>(line: &[f32], row: &mut [f32], t: &Tiles, shift: usize) {
    let first = shift.div_ceil(M);
    let end = ((line.len() + shift) / M).max(first);
    // Image columns `inner` make the groups `first..end` (none on a row shorter than a group).
    let inner = match end > first {
        true => first * M - shift..end * M - shift,
        false => line.len()..line.len(),
    };
    let (groups, phase_len) = (&line[inner.clone()], t.phase_len());
    for p in 0..M {
        let phase = &mut row[p * phase_len + first..p * phase_len + end];
        for (value, group) in phase.iter_mut().zip(groups.chunks_exact(M)) {
            *value = group[p];
        }
    }
    // The columns of partial groups at either end.
    for c in (0..inner.start).chain(inner.end..line.len()) {
        let x = c + shift;
        row[x % M * phase_len + x / M] = line[c];
    }
}

/// V `[C_in][A²][T]` of the images `xg` (T = their tiles, image by image; planes in `layout`) by `transform`,
/// by channel, on all threads when `parallel`; each ξ's T values [`tile_stride`]`(T)` apart.
#[allow(clippy::too_many_arguments)]
fn transform_inputs<const A: usize>(
    xg: &[f32],
    (c_in, h, wd): (usize, usize, usize),
    t: &Tiles,
    v: &mut Vec<f32>,
    isa: Isa,
    parallel: bool,
    transform: Transform,
) {
    let (plane, per_image) = (h * wd, t.count());
    let images = xg.len() / (c_in * plane);
    let stride = tile_stride(images * per_image);
    v.resize(c_in * A * A * stride, 0.0);
    // One chunk per channel.
    each_chunk(v, A * A * stride, parallel, |c, vc| {
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            // The border stays zero: only the interior is rewritten per plane. LANES values of slack after
            // the plane and after the row transforms: `tiles_body` reads whole chunks.
            s.plane.clear();
            s.plane.resize(t.padded_len(), 0.0);
            s.rows.resize(t.rows_len(A), 0.0);
            for j in 0..images {
                let src = &xg[(j * c_in + c) * plane..][..plane];
                let shift = transform.shift();
                for (r, line) in src.chunks(wd).enumerate() {
                    let row = &mut s.plane[(r + shift) * t.row_len()..][..t.row_len()];
                    // M = A − 2 output pixels per tile side (`by_tile!`: A is 4 or 6).
                    match A {
                        4 => split_row::<2>(isa, line, row, t, shift),
                        6 => split_row::<4>(isa, line, row, t, shift),
                        _ => unreachable!("input tiles of 4 or 6"),
                    }
                }
                let job = PlaneTiles {
                    plane: &s.plane,
                    t,
                    rows: &mut s.rows,
                    v: &mut *vc,
                    at: (j * per_image, stride),
                };
                match transform {
                    Transform::Input => tiles::<A, _>(isa, job, b_transposed_times::<A>),
                    Transform::OutputGrad => tiles::<A, _>(isa, job, a_times::<A>),
                }
            }
        })
    });
}

/// How far apart V keeps the values of consecutive ξ for `tiles` tiles: LANES more, so that `tiles_body`
/// writes whole chunks of LANES tiles past the last one.
fn tile_stride(tiles: usize) -> usize {
    tiles + LANES
}

/// The tile whose input tiles are `A`×`A`.
fn tile_of<const A: usize>() -> Tile {
    if A == 4 {
        Tile::F2
    } else {
        Tile::F4
    }
}

/// `dw` `[C_out, C_in, 3, 3]` of `y = conv3x3(x, w)` from `x` and `dy`, by the tiles of [`Tile::for_plane`]:
/// with U = G g Gᵀ and y = Aᵀ (U ⊙ V) A per tile, ∂L/∂U = (A dY Aᵀ) ⊙ V, so dU_ξ = Σ_tiles dM_ξ · V_ξᵀ
/// (dM = A dY Aᵀ, A×A from each m×m tile of dy) is one GEMM per ξ whose depth is every tile of the batch, and
/// dw = Gᵀ dU G. The A² GEMMs run in parallel; images go in chunks of a fixed size (bounding V and dM), each chunk's products added
/// to dU in order: the same result whatever the thread count.
pub fn weight_grad(x: &[f32], dy: &[f32], dims: (usize, usize, usize, usize, usize)) -> Vec<f32> {
    weight_grad_by(default_kernels(dims), x, dy, dims)
}

fn weight_grad_by(
    (tile, isa): (Tile, Isa),
    x: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    by_tile!(tile, weight_grad_tiles(x, dy, dims, isa))
}

fn weight_grad_tiles<const A: usize>(
    x: &[f32],
    dy: &[f32],
    (n, c_in, c_out, h, wd): (usize, usize, usize, usize, usize),
    isa: Isa,
) -> Vec<f32> {
    let t = Tiles::new(h, wd, tile_of::<A>());
    let sizes = (n, c_in, c_out, h * wd);
    let du = weight_grad_sums::<A>((x, dy), sizes, t.count(), |(xc, dyc), tiles, b| {
        let stride = tile_stride(tiles);
        transform_inputs::<A>(xc, (c_in, h, wd), &t, &mut b.v, isa, true, Transform::Input);
        let grad = Transform::OutputGrad;
        transform_inputs::<A>(dyc, (c_out, h, wd), &t, &mut b.m, isa, true, grad);
        // dM_ξ: C_out×T with row stride A²·S (S = stride); V_ξᵀ: T×C_in, element (t, c) at c·A²S + ξS + t.
        let (dm, v) = ((A * A * stride, 1), (1, A * A * stride));
        [(stride, dm), (stride, v)]
    });
    kernels_from_products::<A>(&du, (c_out, c_in), isa)
}

/// Where operand ξ of the weight gradient's per-position GEMMs lies in its buffer: at ξ·`.0`, with (row,
/// column) strides `.1`.
type PositionOperand = (usize, (usize, usize));

/// dU `[A²][C_out][C_in]` of the weight gradient of `x` and `dy` (`n` images of `c_in` and `c_out` channels on
/// `plane` pixels, `per_image` tiles each): image chunk by chunk ([`weight_grad_chunk`]), `transform` fills
/// the thread's buffers with the chunk's dM (`m`) and V (`v`) for `tiles` tiles and says where each position's
/// operand lies, then one GEMM per position adds dM_ξ · V_ξ into dU_ξ, in chunk order: the same sums for any
/// thread count. The plane-wise and the blocked weight gradients differ only in `transform`.
fn weight_grad_sums<const A: usize>(
    (x, dy): (&[f32], &[f32]),
    (n, c_in, c_out, plane): (usize, usize, usize, usize),
    per_image: usize,
    transform: impl Fn((&[f32], &[f32]), usize, &mut Buffers) -> [PositionOperand; 2],
) -> Vec<f32> {
    let chunk = weight_grad_chunk::<A>(n, per_image, (c_in, c_out));
    let mut du = vec![0f32; A * A * c_out * c_in];
    with_kept(&WEIGHT_GRAD_BUFFERS, |buffers| {
        for (k, (xc, dyc)) in x
            .chunks(chunk * c_in * plane)
            .zip(dy.chunks(chunk * c_out * plane))
            .enumerate()
        {
            let tiles = xc.len() / (c_in * plane) * per_image;
            let [(dm_step, dm_strides), (v_step, v_strides)] = transform((xc, dyc), tiles, buffers);
            let (v, dm) = (&*buffers.v, &*buffers.m);
            for_each_chunk(&mut du, c_out * c_in, |xi, du_xi| {
                matmul(
                    (c_out, c_in, tiles),
                    du_xi,
                    k > 0,
                    &dm[xi * dm_step..],
                    dm_strides,
                    &v[xi * v_step..],
                    v_strides,
                    Parallelism::None,
                );
            });
        }
    });
    du
}

/// Images per chunk of the weight gradient: V and dM of a chunk hold at most ~8 M values (32 MB). A function
/// of the sizes alone (the sums' order must not depend on the thread count).
fn weight_grad_chunk<const A: usize>(
    n: usize,
    per_image: usize,
    (c_in, c_out): (usize, usize),
) -> usize {
    (8usize << 20)
        .div_ceil(A * A * per_image * (c_in + c_out))
        .clamp(1, n)
}

/// [`weight_grad`] of blocked `x` and `dy` (`[N, C/L, H, W, L]`, `L` = `lanes`: training on blocked tensors),
/// the tiles transformed from the blocked layout in place, the same tile and sums otherwise.
pub fn weight_grad_blocked(
    x: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize, usize, usize),
    lanes: usize,
) -> Vec<f32> {
    weight_grad_blocked_by(default_kernels(dims), x, dy, dims, lanes)
}

fn weight_grad_blocked_by(
    (tile, isa): (Tile, Isa),
    x: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize, usize, usize),
    lanes: usize,
) -> Vec<f32> {
    let (_, c_in, c_out, _, _) = dims;
    let du = by_tile!(
        tile,
        blocked::weight_grad_products(x, dy, dims, (isa, lanes))
    );
    by_tile!(tile, kernels_from_products(&du, (c_out, c_in), isa))
}

/// dw `[C_out, C_in, 3, 3]` from dU `[A²][C_out][C_in]`: `dw[o][i] = Gᵀ dU[·][o][i] G`, by output channel,
/// LANES input channels at a time.
fn kernels_from_products<const A: usize>(
    du: &[f32],
    (c_out, c_in): (usize, usize),
    isa: Isa,
) -> Vec<f32> {
    let fill = |dw: &mut [MaybeUninit<f32>]| {
        for_each_chunk(dw, c_in * 9, |o, dwo| {
            let job = GradientsTo { du, c_out, o };
            on_kernel_set!(
                isa,
                x86::gradients_avx512::<A>,
                x86::gradients_avx2::<A>,
                gradients_body::<A>,
                (job, dwo)
            )
        })
    };
    // SAFETY: every tap of every (o, i) is written by `gradients_body`.
    unsafe { written_by(c_out * c_in * 9, fill) }
}

/// dU `[A²][C_out][C_in]` of the kernels into output channel `o`, for [`weight_grad_tiles`].
struct GradientsTo<'a> {
    du: &'a [f32],
    c_out: usize,
    o: usize,
}

/// `dw[o][i] = Gᵀ dU[·][o][i] G` for the kernels of `job` into `dwo` (output channel o's `C_in·9` taps), LANES
/// kernels side by side, each lane the operations one kernel alone took (as [`weights_body`]).
#[inline(always)]
fn gradients_body<const A: usize>(job: GradientsTo, dwo: &mut [MaybeUninit<f32>]) {
    let c_in = dwo.len() / 9;
    for i0 in (0..c_in).step_by(LANES) {
        gradient_lanes::<A>(&job, i0..c_in.min(i0 + LANES), dwo);
    }
}

/// [`gradients_body`] for the LANES kernels (at most) from input channels `inputs`.
#[inline(always)]
fn gradient_lanes<const A: usize>(
    &GradientsTo { du, c_out, o }: &GradientsTo,
    inputs: std::ops::Range<usize>,
    dwo: &mut [MaybeUninit<f32>],
) {
    let (len, c_in) = (inputs.len(), dwo.len() / 9);
    // block[r][c]: dU at ξ = r·A + c of the lanes' kernels, contiguous in i.
    let mut block = [[[0f32; LANES]; A]; A];
    for (r, row) in block.iter_mut().enumerate() {
        for (c, lanes) in row.iter_mut().enumerate() {
            let at = ((r * A + c) * c_out + o) * c_in + inputs.start;
            lanes[..len].copy_from_slice(&du[at..][..len]);
        }
    }
    // Columns: (Gᵀ dU) is 3×A; then (Gᵀ dU) G is 3×3.
    let mut cols = [[[0f32; LANES]; 3]; A];
    for (c, col) in cols.iter_mut().enumerate() {
        for l in 0..LANES {
            let g = g_transposed_times::<A>(std::array::from_fn(|r| block[r][c][l]));
            for (k, v) in g.into_iter().enumerate() {
                col[k][l] = v;
            }
        }
    }
    let mut taps = [[0f32; LANES]; 9];
    for ky in 0..3 {
        for l in 0..LANES {
            let g = g_transposed_times::<A>(std::array::from_fn(|c| cols[c][ky][l]));
            for (kx, v) in g.into_iter().enumerate() {
                taps[ky * 3 + kx][l] = v;
            }
        }
    }
    for (l, i) in inputs.enumerate() {
        for (t, d) in dwo[i * 9..][..9].iter_mut().enumerate() {
            d.write(taps[t][l]);
        }
    }
}

/// Tiles (or pixels) the transforms take at a time: each step copies that many values of every line into a
/// fixed-size local block and transforms them lane by lane, which the compiler vectorises over the lanes. The
/// last step of a line takes a whole chunk too, past the line's end: the buffers have that much slack, and
/// what is computed there is never stored where it counts (before, the short last chunks of 7- and 14-wide
/// planes cost more in `memcpy` calls than their transforms).
const LANES: usize = 16;

/// `F d Fᵀ` of every A×A tile `d` of one padded plane in [`Tiles`]' layout (tile (ty, tx) at padded row m·ty,
/// column m·tx; [`Tiles::padded_len`] long), `f(line)` = F·line (Bᵀ for input tiles; A for output-gradient
/// tiles, which reads only the first m of each line): value ξ of tile k goes to `v[ξ·stride + offset + k]`,
/// and values past the plane's tile row to the next LANES − 1 positions (`stride` leaves room for them). Rows
/// first (`F d` over whole padded rows, phase by phase, into `rows`, [`Tiles::rows_len`] long), then columns,
/// one tile row at a time: in the phase layout, column k of LANES consecutive tiles is one contiguous run, so
/// both stages load and store whole vectors.
#[inline(always)]
fn tiles_body<const A: usize>(
    PlaneTiles {
        plane,
        t,
        rows,
        v,
        at: (offset, stride),
    }: PlaneTiles,
    f: impl Fn([f32; A]) -> [f32; A] + Copy,
) {
    let (m, row_len, phase_len) = (A - 2, t.row_len(), t.phase_len());
    // Made once per plane: zeroing it per chunk cost more than the transforms.
    let mut block = [[0f32; LANES]; A];
    for ty in 0..t.th {
        let d = &plane[m * ty * row_len..];
        for x0 in (0..row_len).step_by(LANES) {
            for (k, lanes) in block.iter_mut().enumerate() {
                lanes.copy_from_slice(&d[k * row_len + x0..][..LANES]);
            }
            let block = transform_lanes::<A, LANES>(&block, f);
            for (r, lanes) in block.iter().enumerate() {
                rows[r * row_len + x0..][..LANES].copy_from_slice(lanes);
            }
        }
        let base = offset + ty * t.tw;
        for r in 0..A {
            let line = &rows[r * row_len..];
            for tx0 in (0..t.tw).step_by(LANES) {
                // Column k of tile tx: padded column m·tx + k, phase k mod m, index tx + k / m.
                for (k, lanes) in block.iter_mut().enumerate() {
                    lanes.copy_from_slice(&line[k % m * phase_len + k / m + tx0..][..LANES]);
                }
                let block = transform_lanes::<A, LANES>(&block, f);
                for (j, lanes) in block.iter().enumerate() {
                    v[(r * A + j) * stride + base + tx0..][..LANES].copy_from_slice(lanes);
                }
            }
        }
    }
}

/// `f` of every lane's line of A values: `out[·][l] = f(block[·][l])`.
#[inline(always)]
fn transform_lanes<const A: usize, const L: usize>(
    block: &[[f32; L]; A],
    f: impl Fn([f32; A]) -> [f32; A],
) -> [[f32; L]; A] {
    let mut out = [[0f32; L]; A];
    for l in 0..L {
        let mut line = [0f32; A];
        for (k, value) in line.iter_mut().enumerate() {
            *value = block[k][l];
        }
        for (k, value) in f(line).into_iter().enumerate() {
            out[k][l] = value;
        }
    }
    out
}

/// One output plane from the products of its channel: `Aᵀ M A` for every tile, `M[ξ]` of tile k at
/// `products[ξ·stride + offset + k]` (LANES values of slack after the last), each value `y` of pixel `p`
/// (row-major) given to `store(p, y)`, every pixel once. Every tile's m×m outputs first (into `z`, m² lines of
/// the tile count rounded up to LANES, by output position then tile), then stored row by row.
#[inline(always)]
fn output_tiles_body<const A: usize>(
    Products {
        products,
        at: (offset, stride),
        t,
        z,
    }: Products,
    mut store: impl FnMut(usize, f32),
) {
    let (h, w, count, m) = (t.h, t.w, t.count(), A - 2);
    let z_line = count.next_multiple_of(LANES);
    let z = &mut z[..m * m * z_line];
    // Made once per plane, as in `tiles_body`.
    let mut rows_a = [[[0f32; LANES]; A]; A];
    let mut block = [[0f32; LANES]; A];
    for k0 in (0..count).step_by(LANES) {
        // Aᵀ M A of LANES tiles: M by rows of A values (ξ = r·A + c), then Aᵀ down each column of the block.
        for (r, rows) in rows_a.iter_mut().enumerate() {
            for (c, lanes) in block.iter_mut().enumerate() {
                lanes.copy_from_slice(&products[(r * A + c) * stride + offset + k0..][..LANES]);
            }
            // Row r of M times A: m values.
            *rows = transform_lanes::<A, LANES>(&block, a_transposed_times::<A>);
        }
        for j in 0..m {
            for (r, lanes) in block.iter_mut().enumerate() {
                *lanes = rows_a[r][j];
            }
            let column = transform_lanes::<A, LANES>(&block, a_transposed_times::<A>);
            for (r, lanes) in column.iter().take(m).enumerate() {
                z[(r * m + j) * z_line + k0..][..LANES].copy_from_slice(lanes);
            }
        }
    }
    for ty in 0..t.th {
        for r in 0..m.min(h - m * ty) {
            let oy = m * ty + r;
            for tx in 0..t.tw {
                let k = ty * t.tw + tx;
                for j in 0..m.min(w - m * tx) {
                    store(oy * w + m * tx + j, z[(r * m + j) * z_line + k]);
                }
            }
        }
    }
}

/// One plane's tiles to transform ([`tiles_body`]): the padded plane and its geometry, the row transforms'
/// scratch, and V with where the plane's tiles go in it (offset, stride).
struct PlaneTiles<'a> {
    plane: &'a [f32],
    t: &'a Tiles,
    rows: &'a mut [f32],
    v: &'a mut [f32],
    at: (usize, usize),
}

/// One output plane's products ([`output_tiles_body`]): M, where the plane's tiles are in it (offset,
/// stride), the plane's geometry and the scratch of its tiles' outputs.
struct Products<'a> {
    products: &'a [f32],
    at: (usize, usize),
    t: &'a Tiles,
    z: &'a mut [f32],
}

/// [`tiles_body`] compiled for the kernel set `isa`: its LANES-wide loops become one AVX-512 vector (four SSE
/// ones in the portable build). No FMA contraction either way: the same values on every set.
fn tiles<const A: usize, F: Fn([f32; A]) -> [f32; A] + Copy>(isa: Isa, job: PlaneTiles, f: F) {
    on_kernel_set!(
        isa,
        x86::tiles_avx512::<A, F>,
        x86::tiles_avx2::<A, F>,
        tiles_body::<A>,
        (job, f)
    )
}

/// [`output_tiles_body`] compiled for the kernel set `isa`, as [`tiles`].
fn output_tiles<const A: usize, S: FnMut(usize, f32)>(isa: Isa, job: Products, store: S) {
    on_kernel_set!(
        isa,
        x86::output_tiles_avx512::<A, S>,
        x86::output_tiles_avx2::<A, S>,
        output_tiles_body::<A>,
        (job, store)
    )
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{
        gradients_body, output_tiles_body, split_phases, tiles_body, weights_body, GradientsTo,
        KernelsTo, PlaneTiles, Products, Tiles,
    };
    use std::mem::MaybeUninit;

    /// Entry points that compile the transforms with `$features`.
    macro_rules! entries {
        ($input:ident, $output:ident, $weights:ident, $gradients:ident, $phases:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $phases<const M: usize>(
                line: &[f32],
                row: &mut [f32],
                t: &Tiles,
                shift: usize,
            ) {
                split_phases::<M>(line, row, t, shift)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $input<const A: usize, F: Fn([f32; A]) -> [f32; A] + Copy>(
                job: PlaneTiles,
                f: F,
            ) {
                tiles_body::<A>(job, f)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $output<const A: usize, S: FnMut(usize, f32)>(
                job: Products,
                store: S,
            ) {
                output_tiles_body::<A>(job, store)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $weights<const A: usize>(
                job: KernelsTo,
                uo: &mut [MaybeUninit<f32>],
            ) {
                weights_body::<A>(job, uo)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $gradients<const A: usize>(
                job: GradientsTo,
                dwo: &mut [MaybeUninit<f32>],
            ) {
                gradients_body::<A>(job, dwo)
            }
        };
    }
    entries!(
        tiles_avx2,
        output_tiles_avx2,
        weights_avx2,
        gradients_avx2,
        split_phases_avx2,
        "avx2"
    );
    entries!(
        tiles_avx512,
        output_tiles_avx512,
        weights_avx512,
        gradients_avx512,
        split_phases_avx512,
        "avx512f"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    /// `got` within `tolerance` of the largest magnitude of `want`, element by element.
    fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= tolerance * scale, "{what}: {diff} of {scale}");
    }

    /// How close each tile comes to candle's reference: F(4×4)'s transforms (factors up to 8 and 1/24) round
    /// more. The weight gradient of 40 images of 300 channels on 9×9 differed by ~1.1e-6 of its largest value
    /// with F(2×2) and 1.0–1.25e-5 with F(4×4) (three runs, the same on every kernel set).
    fn tolerance(tile: Tile) -> f32 {
        match tile {
            Tile::F2 => 1e-5,
            Tile::F4 => 4e-5,
        }
    }

    fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
        t.flatten_all()?.to_vec1::<f32>()
    }

    /// Both tiles, each with the transforms of every kernel set this CPU runs.
    fn every_tile_and_isa() -> Vec<(Tile, Isa)> {
        [Tile::F2, Tile::F4]
            .into_iter()
            .flat_map(|tile| Isa::available().into_iter().map(move |isa| (tile, isa)))
            .collect()
    }

    #[test]
    fn images_per_group_follows_the_plane_size() {
        assert_eq!(images_per_group(16, 16), 8); // ResNet-18's 7×7 stage: 128 tiles
        assert_eq!(images_per_group(16, 49), 3); // 14×14
        assert_eq!(images_per_group(16, 196), 1); // 28×28
        assert_eq!(images_per_group(5, 6), 2);
        assert_eq!(images_per_group(2, 1), 1);
    }

    /// Forward and input gradient against candle's own convolution and autograd, on even and odd sizes (a
    /// 70-wide plane: tile rows of more than one chunk of lanes), one image (every stage on all threads) or groups of images per GEMM (called directly: `applies` would route
    /// these small shapes elsewhere). The last two run in groups of two images (a partial group at the end of
    /// the first).
    #[test]
    fn forward_and_input_gradient_equal_candles_convolution() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for dims in [
            (2, 5, 7, 6, 10),
            (1, 3, 4, 7, 5),
            (3, 8, 2, 1, 3),
            (5, 4, 3, 3, 5),
            (4, 3, 6, 7, 7),
            (2, 3, 4, 9, 70),
        ] {
            let (n, c_in, c_out, h, w) = dims;
            let x = Var::randn(0f32, 1.0, (n, c_in, h, w), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)?;
            let reference = x.as_tensor().conv2d(&k, 1, 1, 1, 1)?;
            let up = Tensor::randn(0f32, 1.0, reference.shape(), &dev)?;
            let grad = (&reference * &up)?.sum_all()?.backward()?;
            for by in every_tile_and_isa() {
                let tol = tolerance(by.0);
                let ours = convolve(by, &flat(x.as_tensor())?, &flat(&k)?, dims, false);
                let want = flat(&reference)?;
                assert_close(&format!("{by:?} forward {dims:?}"), &ours, &want, tol);
                let dx = convolve(by, &flat(&up)?, &flat(&k)?, dims, true);
                let want = flat(grad.get(&x).unwrap())?;
                assert_close(&format!("{by:?} input gradient {dims:?}"), &dx, &want, tol);
            }
        }
        Ok(())
    }

    /// `[N, C, H, W]` values in the blocked layout `[N, C/B, H, W, B]`.
    fn to_blocked(v: &[f32], (c, plane): (usize, usize), lanes: usize) -> Vec<f32> {
        let mut out = vec![0f32; v.len()];
        for (at, value) in v.iter().enumerate() {
            let (p, ch, img) = (at % plane, at / plane % c, at / (plane * c));
            out[((img * c + ch / lanes * lanes) * plane + p * lanes) + ch % lanes] = *value;
        }
        out
    }

    /// The blocked forward with its finish (bias, residual, ReLU or not) against the NCHW forward finished
    /// by hand: one image (stages on all threads), groups of two with a partial last one, odd planes, blocks
    /// of 8 (every kernel set) and of 16 (AVX-512's).
    #[test]
    fn blocked_forward_equals_the_nchw_one_finished() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // (images, input blocks, output blocks, h, w), ReLU
        let shapes = [
            ((1, 1, 2, 6, 10), true),
            ((5, 2, 1, 3, 5), false),
            ((3, 1, 1, 7, 7), true),
        ];
        for (lanes, ((n, bi, bo, h, w), relu)) in
            [8, 16].into_iter().flat_map(|l| shapes.map(|s| (l, s)))
        {
            let (c_in, c_out) = (bi * lanes, bo * lanes);
            let dims = (n, c_in, c_out, h, w);
            let plane = h * w;
            let x = flat(&Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev)?)?;
            let k = flat(&Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)?)?;
            let residual = flat(&Tensor::randn(0f32, 1.0, (n, c_out, h, w), &dev)?)?;
            let bias: Vec<f32> = (0..c_out).map(|c| c as f32 * 0.25 - 1.0).collect();
            let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
            for (tile, isa) in every_tile_and_isa() {
                let want: Vec<f32> = convolve((tile, isa), &x, &k, dims, false)
                    .iter()
                    .zip(&residual)
                    .enumerate()
                    .map(|(at, (y, r))| ((y + bias[at / plane % c_out]) + r).max(floor))
                    .collect();
                let blocked_residual = to_blocked(&residual, (c_out, plane), lanes);
                let finish = Finish {
                    bias: &bias,
                    relu,
                    residual: Some(&blocked_residual),
                };
                let u = forward_weights(&k, (c_out, c_in), tile);
                let blocked_x = to_blocked(&x, (c_in, plane), lanes);
                // SAFETY: `forward_blocked` writes every value.
                let got = unsafe {
                    written_by(want.len(), |y| {
                        forward_blocked(&blocked_x, (&u, tile, isa), dims, lanes, finish, y)
                    })
                };
                // The GEMMs read their operands in other layouts: equal to rounding, not necessarily to the
                // bit.
                assert_close(
                    &format!("{tile:?} {isa} blocked forward {dims:?}"),
                    &got,
                    &to_blocked(&want, (c_out, plane), lanes),
                    tolerance(tile),
                );
            }
        }
        Ok(())
    }

    /// The weight gradient against candle's autograd, on even and odd sizes, in one chunk of images or several
    /// (the last: chunks of 35 and 5 images).
    #[test]
    fn weight_gradient_equals_candles() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for dims in [
            (2, 5, 7, 6, 10),
            (1, 3, 4, 7, 5),
            (3, 8, 2, 1, 3),
            (2, 3, 4, 9, 70),
            (40, 300, 300, 9, 9),
        ] {
            let (n, c_in, c_out, h, w) = dims;
            let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev)?;
            let k = Var::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)?;
            let y = x.conv2d(k.as_tensor(), 1, 1, 1, 1)?;
            let up = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
            let want = flat((&y * &up)?.sum_all()?.backward()?.get(&k).unwrap())?;
            for by in every_tile_and_isa() {
                let got = weight_grad_by(by, &flat(&x)?, &flat(&up)?, dims);
                let what = format!("{by:?} weight gradient {dims:?}");
                assert_close(&what, &got, &want, tolerance(by.0));
            }
        }
        Ok(())
    }

    /// The input gradient's weights transformed straight from `w` equal the forward's transform of the flipped,
    /// channel-swapped kernels, bit for bit (odd channel counts: partial lanes and tasks).
    #[test]
    fn input_gradient_weights_equal_the_flipped_kernels_transformed() -> candle_core::Result<()> {
        for (c_out, c_in) in [(16, 8), (5, 37), (40, 3)] {
            let w = flat(&Tensor::randn(
                0f32,
                1.0,
                (c_out, c_in, 3, 3),
                &Device::Cpu,
            )?)?;
            let flipped: Vec<f32> = (0..c_in * c_out)
                .flat_map(|k| kernel_3x3(&w, c_in, true, (k / c_out, k % c_out)))
                .collect();
            for tile in [Tile::F2, Tile::F4] {
                assert_eq!(
                    input_grad_weights(&w, (c_out, c_in), tile),
                    forward_weights(&flipped, (c_in, c_out), tile),
                    "{tile:?} {c_out}→{c_in}"
                );
            }
        }
        Ok(())
    }

    /// The weight gradient of blocked tensors (transforms reading blocks of 8 and 16 channels in place) against
    /// candle's autograd, on even and odd planes, in one chunk of images or several (the last: 24 images of 64
    /// channels on 30×30: with F(2×2) chunks of 19 and 5 images).
    #[test]
    fn blocked_weight_gradient_equals_candles() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (n, bi, bo, h, w) in [
            (2, 1, 2, 6, 10),
            (3, 2, 1, 7, 5),
            (1, 1, 1, 1, 3),
            (24, 4, 4, 30, 30),
        ] {
            for lanes in [8, 16] {
                let (c_in, c_out) = (bi * lanes, bo * lanes);
                let dims = (n, c_in, c_out, h, w);
                let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev)?;
                let k = Var::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)?;
                let y = x.conv2d(k.as_tensor(), 1, 1, 1, 1)?;
                let up = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
                let want = flat((&y * &up)?.sum_all()?.backward()?.get(&k).unwrap())?;
                let plane = h * w;
                let (xb, upb) = (
                    to_blocked(&flat(&x)?, (c_in, plane), lanes),
                    to_blocked(&flat(&up)?, (c_out, plane), lanes),
                );
                for by in every_tile_and_isa() {
                    let got = weight_grad_blocked_by(by, &xb, &upb, dims, lanes);
                    let what =
                        format!("{by:?} blocked weight gradient {dims:?}, blocks of {lanes}");
                    assert_close(&what, &got, &want, tolerance(by.0));
                }
            }
        }
        Ok(())
    }
}
