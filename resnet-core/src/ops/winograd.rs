//! Winograd F(2×2, 3×3) convolution (Lavin & Gray, 2016) for the wide 3×3, stride-1, padding-1 layers: each
//! 2×2 output tile takes 16 multiplies per channel pair instead of 36, as 16 GEMMs of the transformed weights
//! with the transformed input tiles (the `gemm` crate), between cheap linear transforms. Used for the forward
//! pass and the input gradient (the same convolution of the output gradient with the kernel flipped and its
//! channel axes swapped), on NCHW data, and for folded inference's forward on the channel-blocked layout with
//! the bias, residual and ReLU applied as the outputs are stored (`forward_blocked`). Narrow layers, whose
//! transforms would cost as much as the products, stay direct.
//!
//!   U = G g Gᵀ (weights),  V = Bᵀ d B (4×4 input tiles),  M_ξ = U_ξ · V_ξ (ξ = 0..16),  y = Aᵀ M A (2×2)

use crate::ops::cpu_slice::written_by;
use crate::ops::gemm::matmul;
use crate::ops::taps::kernel_3x3;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// Transformed tile positions: 4×4.
const XI: usize = 16;

/// Whether the Winograd path runs a 3×3/stride-1/padding-1 convolution of `c_in` → `c_out` channels over
/// `n` images of `h`×`w`: wide layers (ResNet-18, 128→128 on 28×28: 238 vs 194 GFLOP/s-equivalent; at 64
/// channels the short GEMMs and the transforms lose to the direct kernel: 143 vs 185), whose GEMMs get at
/// least 64 tiles (one image or a group, see [`images_per_group`]): 512→512 on 7×7 at batch 16, eight images
/// per GEMM, ~200 vs ~155 by im2col + GEMM; one 7×7 image alone (16 tiles) ~60. Never the thread count: the
/// result must not depend on it.
pub fn applies(n: usize, (c_in, c_out): (usize, usize), (h, w): (usize, usize)) -> bool {
    let tiles = Tiles::new(h, w).count();
    c_in >= 128 && c_out >= 128 && n >= 1 && images_per_group(n, tiles) * tiles >= MIN_GEMM_TILES
}

/// Whether [`weight_grad`] runs: where [`applies`], on even planes (ResNet-18, batch 16, GFLOP/s-equivalent
/// against im2col + GEMM: 128→128 on 28×28 ~215 vs ~180, 256→256 on 14×14 ~230 vs ~170; on 7×7, where a third
/// of the tiles' outputs are padding, ~120 vs ~140).
pub fn weight_grad_applies(n: usize, channels: (usize, usize), (h, w): (usize, usize)) -> bool {
    applies(n, channels, (h, w)) && h.is_multiple_of(2) && w.is_multiple_of(2)
}

/// Tiles per GEMM from which Winograd's algorithm wins.
const MIN_GEMM_TILES: usize = 64;

/// `y = conv3x3(x, w)` (`n·c_out·h·w` values).
pub fn forward(x: &[f32], w: &[f32], dims: (usize, usize, usize, usize, usize)) -> Vec<f32> {
    let (n, c_in, c_out, h, wd) = dims;
    run(
        x,
        &transform_weights(w, (c_out, c_in), false),
        (n, c_in, c_out, h, wd),
    )
}

/// `dx` of `y = conv3x3(x, w)` from `dy`: `conv3x3(dy, w')`, `w'[ci, co, ky, kx] = w[co, ci, 2−ky, 2−kx]`.
pub fn input_grad(dy: &[f32], w: &[f32], dims: (usize, usize, usize, usize, usize)) -> Vec<f32> {
    let (n, c_in, c_out, h, wd) = dims;
    run(
        dy,
        &transform_weights(w, (c_out, c_in), true),
        (n, c_out, c_in, h, wd),
    )
}

/// `U[o][ξ][i] = (G g Gᵀ)[ξ]` for every kernel `g` of `w` `[C_out, C_in, 3, 3]`, by output channel on all
/// threads; `transposed` transforms `w'` of [`input_grad`] instead (o and i swapped, taps flipped). U_ξ is
/// then the `outs`×`ins` matrix at offset ξ·ins with row stride 16·ins.
fn transform_weights(w: &[f32], (c_out, c_in): (usize, usize), transposed: bool) -> Vec<f32> {
    let (outs, ins) = if transposed {
        (c_in, c_out)
    } else {
        (c_out, c_in)
    };
    let mut u = vec![0f32; outs * XI * ins];
    u.par_chunks_mut(XI * ins).enumerate().for_each(|(o, uo)| {
        for i in 0..ins {
            let k = kernel_3x3(w, c_in, transposed, (o, i));
            let g = |r: usize, c: usize| k[r * 3 + c];
            // G g (4×3), column by column, then (G g) Gᵀ row by row.
            let cols: [[f32; 4]; 3] = std::array::from_fn(|c| g_times([g(0, c), g(1, c), g(2, c)]));
            for r in 0..4 {
                let row = g_times([cols[0][r], cols[1][r], cols[2][r]]);
                for (c, v) in row.iter().enumerate() {
                    uo[(r * 4 + c) * ins + i] = *v;
                }
            }
        }
    });
    u
}

/// `G·[a, b, d]`, G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
fn g_times([a, b, d]: [f32; 3]) -> [f32; 4] {
    [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d]
}

thread_local! {
    /// Per group of images: transformed input tiles V `[C_in][16][T]` and products M `[16][C_out][T]`.
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
    /// Per thread: one zero-bordered input plane and the row transforms of one tile row.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Buffers {
    v: Vec<f32>,
    m: Vec<f32>,
}

#[derive(Default)]
struct Scratch {
    plane: Vec<f32>,
    rows: Vec<f32>,
    /// The planes of one block of channels (blocked layout).
    planes: Vec<f32>,
}

/// Tile geometry of one plane: `th`×`tw` tiles; the padded plane is `(2·th + 2)`×`(2·tw + 2)`, image at (1, 1).
#[derive(Clone, Copy)]
struct Tiles {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Tiles {
    fn new(h: usize, w: usize) -> Self {
        Self {
            h,
            w,
            th: h.div_ceil(2),
            tw: w.div_ceil(2),
        }
    }

    fn count(&self) -> usize {
        self.th * self.tw
    }

    /// Padded row length.
    fn pw(&self) -> usize {
        2 * self.tw + 2
    }

    fn padded_len(&self) -> usize {
        (2 * self.th + 2) * self.pw()
    }
}

/// Images per group: the 16 GEMMs of a group run over the tiles of all its images, so that small planes still
/// give long GEMMs (a 7×7 plane has 16 tiles; alone, its GEMMs ran at ~125–150 GFLOP/s, eight at a time at
/// ~200). About 128 tiles, no more: larger groups' V and M outgrow the cache (28×28 by twos: 195 vs 245); and
/// at least two groups, for the threads. A function of the shape alone: each GEMM column is one tile,
/// computed the same way whatever the group.
fn images_per_group(n: usize, tiles: usize) -> usize {
    128usize.div_ceil(tiles).min(n / 2).max(1)
}

/// The layout of a batch's planes: NCHW, or channel-blocked `[N, C/B, H, W, B]` (`ops::blocked`, `lanes` = B),
/// whose outputs are finished as they are stored.
#[derive(Debug, Clone, Copy)]
enum Planes<'a> {
    Nchw,
    Blocked { lanes: usize, finish: Finish<'a> },
}

impl<'a> Planes<'a> {
    /// Channels per block: 1 for NCHW.
    fn lanes(self) -> usize {
        match self {
            Planes::Nchw => 1,
            Planes::Blocked { lanes, .. } => lanes,
        }
    }

    /// The layout of the images from `first` on, each `image_out` output values (the residual moves with them).
    fn images_from(self, first: usize, image_out: usize) -> Planes<'a> {
        match self {
            Planes::Nchw => Planes::Nchw,
            Planes::Blocked { lanes, finish } => Planes::Blocked {
                lanes,
                finish: Finish {
                    residual: finish.residual.map(|r| &r[first * image_out..]),
                    ..finish
                },
            },
        }
    }

    /// The index of pixel 0 of channel `c` of image `j` in a batch of `channels` planes of `plane` pixels;
    /// pixel p is `lanes()·p` further.
    fn origin(self, (channels, plane): (usize, usize), j: usize, c: usize) -> usize {
        let b = self.lanes();
        (j * channels + c / b * b) * plane + c % b
    }
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

/// The transformed weights U of `conv3x3(·, w)`, `w` `[C_out, C_in, 3, 3]`, for [`forward_blocked`].
pub fn forward_weights(w: &[f32], (c_out, c_in): (usize, usize)) -> Vec<f32> {
    transform_weights(w, (c_out, c_in), false)
}

/// `ReLU?(conv3x3(x, w) + bias (+ residual))` of a blocked `x` (`[N, C_in/B, H, W, B]`) into the blocked output
/// `y` (every value written), with `u` = [`forward_weights`] of `w`. Channels in whole blocks of `lanes`.
pub fn forward_blocked(
    x: &[f32],
    u: &[f32],
    dims: (usize, usize, usize, usize, usize),
    lanes: usize,
    finish: Finish,
    y: &mut [MaybeUninit<f32>],
) {
    run_into(x, u, dims, Planes::Blocked { lanes, finish }, y)
}

fn run(x: &[f32], u: &[f32], dims: (usize, usize, usize, usize, usize)) -> Vec<f32> {
    let (n, _, c_out, h, wd) = dims;
    // SAFETY: `run_into` writes every value of y.
    unsafe {
        written_by(n * c_out * h * wd, |y| {
            run_into(x, u, dims, Planes::Nchw, y)
        })
    }
}

/// The convolution of `x` into `y` (both in `layout`), every value of `y` written.
fn run_into(
    x: &[f32],
    u: &[f32],
    (n, c_in, c_out, h, wd): (usize, usize, usize, usize, usize),
    layout: Planes,
    y: &mut [MaybeUninit<f32>],
) {
    let t = Tiles::new(h, wd);
    let group = images_per_group(n, t.count());
    let dims = (c_in, c_out, h, wd);
    let group_out = group * c_out * h * wd;
    if n > group {
        // Groups in parallel, each on one thread.
        y.par_chunks_mut(group_out)
            .zip(x.par_chunks(group * c_in * h * wd))
            .enumerate()
            .for_each(|(g, (yg, xg))| {
                BUFFERS.with(|b| {
                    let b = &mut *b.borrow_mut();
                    let io = layout.images_from(g * group, c_out * h * wd);
                    run_group(xg, u, yg, dims, &t, (&mut b.v, &mut b.m), io, false);
                })
            });
    } else {
        // One group (a single image): each stage on all threads.
        let (mut v, mut m) = (Vec::new(), Vec::new());
        run_group(x, u, y, dims, &t, (&mut v, &mut m), layout, true);
    }
}

/// `f(i, chunk)` for the `len`-long chunks of `data`, on all threads or on this one.
fn each_chunk<T: Send>(
    data: &mut [T],
    len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        data.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// The images `xg` of one group into their outputs `yg`: V `[C_in][16][T]` and M `[16][C_out][T]` over the
/// group's T tiles (image by image), the transforms by channel and the 16 GEMMs, each stage on all threads
/// when `parallel`. Input and output planes in `layout` (a blocked one's finish applied as outputs are stored).
#[allow(clippy::too_many_arguments)]
fn run_group(
    xg: &[f32],
    u: &[f32],
    yg: &mut [MaybeUninit<f32>],
    (c_in, c_out, h, wd): (usize, usize, usize, usize),
    t: &Tiles,
    (v, m): (&mut Vec<f32>, &mut Vec<f32>),
    layout: Planes,
    parallel: bool,
) {
    let (plane, per_image) = (h * wd, t.count());
    let images = xg.len() / (c_in * plane);
    let tiles = images * per_image;
    m.resize(XI * c_out * tiles, 0.0);
    transform_inputs(xg, (c_in, h, wd), t, v, layout, parallel);
    let v = &*v;
    each_chunk(m, c_out * tiles, parallel, |xi_pos, m_xi| {
        // U_ξ: c_out×c_in with row stride 16·c_in; V_ξ: c_in×T with row stride 16·T; M_ξ row-major.
        matmul(
            (c_out, tiles, c_in),
            m_xi,
            false,
            &u[xi_pos * c_in..],
            (XI * c_in, 1),
            &v[xi_pos * tiles..],
            (XI * tiles, 1),
            Parallelism::None,
        );
    });
    let m = &*m;
    // One chunk per block of channels of one image: `lanes` planes, interleaved where blocked.
    let lanes = layout.lanes();
    each_chunk(yg, plane * lanes, parallel, |k, out| {
        let (j, c0) = (k / (c_out / lanes), k % (c_out / lanes) * lanes);
        let from = |c: usize| (c * tiles + j * per_image, c_out * tiles);
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            s.rows.resize(s.rows.len().max(2 * per_image), 0.0);
            let Planes::Blocked { finish: f, .. } = layout else {
                return output_tiles(m, from(c0), t, &mut s.rows, |p, y| {
                    out[p].write(y);
                });
            };
            // The block's planes one after the other, then interleaved as they are finished: each pass over
            // the block (50 KB for 16 channels of 28×28) once, not once per channel.
            s.planes.resize(lanes * plane, 0.0);
            for (lane, dst) in s.planes.chunks_exact_mut(plane).enumerate() {
                output_tiles(m, from(c0 + lane), t, &mut s.rows, |p, y| dst[p] = y);
            }
            let floor = if f.relu { 0.0 } else { f32::NEG_INFINITY };
            let residual = f.residual.map(|r| &r[k * plane * lanes..][..plane * lanes]);
            let bias = &f.bias[c0..c0 + lanes];
            for (p, pixel) in out.chunks_exact_mut(lanes).enumerate() {
                for (lane, o) in pixel.iter_mut().enumerate() {
                    let v = s.planes[lane * plane + p] + bias[lane];
                    let v = residual.map_or(v, |r| v + r[p * lanes + lane]);
                    o.write(v.max(floor));
                }
            }
        })
    });
}

/// V `[C_in][16][T]` of the images `xg` (T = their tiles, image by image; planes in `layout`), by channel,
/// on all threads when `parallel`.
fn transform_inputs(
    xg: &[f32],
    (c_in, h, wd): (usize, usize, usize),
    t: &Tiles,
    v: &mut Vec<f32>,
    layout: Planes,
    parallel: bool,
) {
    let (plane, per_image) = (h * wd, t.count());
    let images = xg.len() / (c_in * plane);
    let tiles = images * per_image;
    let lanes = layout.lanes();
    v.resize(c_in * XI * tiles, 0.0);
    // One chunk per block of channels: a blocked block is first split into its planes, in one pass.
    each_chunk(v, lanes * XI * tiles, parallel, |cb, vb| {
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            // The border stays zero: only the interior is rewritten per plane.
            s.plane.clear();
            s.plane.resize(t.padded_len(), 0.0);
            s.rows.resize(4 * t.pw(), 0.0);
            for j in 0..images {
                let block = &xg[layout.origin((c_in, plane), j, cb * lanes)..][..lanes * plane];
                let planes = match lanes {
                    1 => block,
                    _ => {
                        // The portable form of `blocked::layout::block_to_nchw`: calling that one (8×8
                        // transposes) was no faster, ResNet-50 at batch 16 slower in 6 of 8 alternated rounds
                        // (AMD EPYC Zen 4, a ~2 % median).
                        s.planes.resize(lanes * plane, 0.0);
                        for (p, pixel) in block.chunks_exact(lanes).enumerate() {
                            for (lane, v) in pixel.iter().enumerate() {
                                s.planes[lane * plane + p] = *v;
                            }
                        }
                        &s.planes
                    }
                };
                for (src, vc) in planes
                    .chunks_exact(plane)
                    .zip(vb.chunks_exact_mut(XI * tiles))
                {
                    for (r, line) in src.chunks(wd).enumerate() {
                        let at = (r + 1) * t.pw() + 1;
                        s.plane[at..at + wd].copy_from_slice(line);
                    }
                    input_tiles(&s.plane, t, &mut s.rows, vc, j * per_image, tiles);
                }
            }
        })
    });
}

/// `dw` `[C_out, C_in, 3, 3]` of `y = conv3x3(x, w)` from `x` and `dy`: with U = G g Gᵀ and y = Aᵀ (U ⊙ V) A
/// per tile, ∂L/∂U = (A dY Aᵀ) ⊙ V, so dU_ξ = Σ_tiles dM_ξ · V_ξᵀ (dM = A dY Aᵀ, 4×4 from each 2×2 tile of dy)
/// is one GEMM per ξ whose depth is every tile of the batch, and dw = Gᵀ dU G. The 16 GEMMs run in parallel;
/// images go in chunks of a fixed size (bounding V and dM), each chunk's products added to dU in order: the
/// same result whatever the thread count.
pub fn weight_grad(
    x: &[f32],
    dy: &[f32],
    (n, c_in, c_out, h, wd): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let t = Tiles::new(h, wd);
    let per_image = t.count();
    // V and dM of a chunk: at most ~8 M values (32 MB).
    let chunk = (8usize << 20)
        .div_ceil(XI * per_image * (c_in + c_out))
        .clamp(1, n);
    let mut du = vec![0f32; XI * c_out * c_in];
    let (mut v, mut dm) = (Vec::new(), Vec::new());
    for (k, (xc, dyc)) in x
        .chunks(chunk * c_in * h * wd)
        .zip(dy.chunks(chunk * c_out * h * wd))
        .enumerate()
    {
        let tiles = (xc.len() / (c_in * h * wd)) * per_image;
        transform_inputs(xc, (c_in, h, wd), &t, &mut v, Planes::Nchw, true);
        transform_output_grads(dyc, (c_out, h, wd), &t, &mut dm);
        let (v, dm) = (&v, &dm);
        du.par_chunks_mut(c_out * c_in)
            .enumerate()
            .for_each(|(xi_pos, du_xi)| {
                // dM_ξ: c_out×T with row stride 16·T; V_ξᵀ: T×c_in, element (t, c) at c·16T + ξT + t.
                matmul(
                    (c_out, c_in, tiles),
                    du_xi,
                    k > 0,
                    &dm[xi_pos * tiles..],
                    (XI * tiles, 1),
                    &v[xi_pos * tiles..],
                    (1, XI * tiles),
                    Parallelism::None,
                );
            });
    }
    // dw[o][i] = Gᵀ dU[·][o][i] G, by output channel.
    let mut dw = vec![0f32; c_out * c_in * 9];
    dw.par_chunks_mut(c_in * 9)
        .enumerate()
        .for_each(|(o, dwo)| {
            for (i, taps) in dwo.chunks_mut(9).enumerate() {
                let du_at = |r: usize, c: usize| du[((r * 4 + c) * c_out + o) * c_in + i];
                // Rows: (Gᵀ dU) is 3×4; then (Gᵀ dU) G is 3×3.
                let rows: [[f32; 4]; 3] = std::array::from_fn(|ky| {
                    std::array::from_fn(|c| {
                        g_transposed_times([du_at(0, c), du_at(1, c), du_at(2, c), du_at(3, c)])[ky]
                    })
                });
                for (ky, row) in rows.iter().enumerate() {
                    let out = g_transposed_times(*row);
                    taps[ky * 3..ky * 3 + 3].copy_from_slice(&out);
                }
            }
        });
    dw
}

/// `Gᵀ·[a, b, c, d]`, Gᵀ = [[1, ½, ½, 0], [0, ½, −½, 0], [0, ½, ½, 1]].
fn g_transposed_times([a, b, c, d]: [f32; 4]) -> [f32; 3] {
    [a + 0.5 * (b + c), 0.5 * (b - c), 0.5 * (b + c) + d]
}

/// dM `[C_out][16][T]` of the output gradients `dy` (T = their tiles, image by image): `A dY Aᵀ` of every 2×2
/// tile (zeros past the plane's edge), A = [[1, 0], [1, 1], [1, −1], [0, −1]]; by channel, on all threads.
fn transform_output_grads(
    dy: &[f32],
    (c_out, h, wd): (usize, usize, usize),
    t: &Tiles,
    dm: &mut Vec<f32>,
) {
    let (plane, per_image) = (h * wd, t.count());
    let images = dy.len() / (c_out * plane);
    let tiles = images * per_image;
    dm.resize(c_out * XI * tiles, 0.0);
    let a_times = |p: f32, q: f32| [p, p + q, p - q, -q];
    dm.par_chunks_mut(XI * tiles)
        .enumerate()
        .for_each(|(c, dmc)| {
            for j in 0..images {
                let src = &dy[(j * c_out + c) * plane..][..plane];
                let at = |y: usize, x: usize| {
                    if y < h && x < wd {
                        src[y * wd + x]
                    } else {
                        0.0
                    }
                };
                for ty in 0..t.th {
                    for tx in 0..t.tw {
                        let k = j * per_image + ty * t.tw + tx;
                        let (y, x) = (2 * ty, 2 * tx);
                        // A g: 4 rows of 2; then each row times Aᵀ: 4 values.
                        let col0 = a_times(at(y, x), at(y + 1, x));
                        let col1 = a_times(at(y, x + 1), at(y + 1, x + 1));
                        for r in 0..4 {
                            for (cc, v) in a_times(col0[r], col1[r]).into_iter().enumerate() {
                                dmc[(r * 4 + cc) * tiles + k] = v;
                            }
                        }
                    }
                }
            }
        });
}

/// `Bᵀ d B` of every 4×4 tile `d` of one zero-bordered plane (tile (ty, tx) at padded row 2ty, column 2tx):
/// value ξ of tile k goes to `v[ξ·stride + offset + k]`. Rows first (`Bᵀ d`, over whole padded rows), then
/// columns, one tile row at a time, so that both loops run over contiguous data.
fn input_tiles(
    plane: &[f32],
    t: &Tiles,
    rows: &mut [f32],
    v: &mut [f32],
    offset: usize,
    stride: usize,
) {
    let pw = t.pw();
    for ty in 0..t.th {
        let d = |k: usize| &plane[(2 * ty + k) * pw..(2 * ty + k + 1) * pw];
        let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
        let (t0, rest) = rows.split_at_mut(pw);
        let (t1, rest) = rest.split_at_mut(pw);
        let (t2, t3) = rest.split_at_mut(pw);
        for x in 0..pw {
            t0[x] = d0[x] - d2[x];
            t1[x] = d1[x] + d2[x];
            t2[x] = d2[x] - d1[x];
            t3[x] = d1[x] - d3[x];
        }
        let base = offset + ty * t.tw;
        for (r, row) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
            let out = |j: usize| (r * 4 + j) * stride + base;
            let (o0, o1, o2, o3) = (out(0), out(1), out(2), out(3));
            for tx in 0..t.tw {
                let (a, b, c, e) = (
                    row[2 * tx],
                    row[2 * tx + 1],
                    row[2 * tx + 2],
                    row[2 * tx + 3],
                );
                v[o0 + tx] = a - c;
                v[o1 + tx] = b + c;
                v[o2 + tx] = c - b;
                v[o3 + tx] = b - e;
            }
        }
    }
}

/// One output plane from the products of its channel: `Aᵀ m A` for every tile, `m[ξ]` of tile k at
/// `m[ξ·stride + offset + k]`, each value `y` of pixel `p` (row-major) given to `store(p, y)`, every pixel once.
/// Output row r of every tile at once (contiguous runs over the plane's tiles, which vectorise), then those
/// values stored; `z` holds 2 values per tile.
fn output_tiles(
    m: &[f32],
    (offset, stride): (usize, usize),
    t: &Tiles,
    z: &mut [f32],
    mut store: impl FnMut(usize, f32),
) {
    let (h, w, count) = (t.h, t.w, t.count());
    let (z0, z1) = z[..2 * count].split_at_mut(count);
    for r in 0..2 {
        // Row r of Aᵀ m: s_c = m_c + m_{4+c} + m_{8+c} (r = 0) or m_{4+c} − m_{8+c} − m_{12+c} (r = 1).
        let rows: [&[f32]; 12] =
            std::array::from_fn(|i| &m[(4 * r + i) * stride + offset..][..count]);
        let sign = if r == 0 { 1.0 } else { -1.0 };
        for k in 0..count {
            let s = |c: usize| rows[c][k] + sign * rows[4 + c][k] + sign * rows[8 + c][k];
            let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
            z0[k] = s0 + s1 + s2;
            z1[k] = s1 - s2 - s3;
        }
        for ty in 0..t.th {
            let oy = 2 * ty + r;
            if oy >= h {
                break;
            }
            for tx in 0..t.tw {
                let k = ty * t.tw + tx;
                store(oy * w + 2 * tx, z0[k]);
                if 2 * tx + 1 < w {
                    store(oy * w + 2 * tx + 1, z1[k]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    /// `got` within 1e-5 of the largest magnitude of `want`, element by element.
    fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "{what}: {diff} of {scale}");
    }

    fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
        t.flatten_all()?.to_vec1::<f32>()
    }

    #[test]
    fn images_per_group_follows_the_plane_size() {
        assert_eq!(images_per_group(16, 16), 8); // ResNet-18's 7×7 stage: 128 tiles
        assert_eq!(images_per_group(16, 49), 3); // 14×14
        assert_eq!(images_per_group(16, 196), 1); // 28×28
        assert_eq!(images_per_group(5, 6), 2);
        assert_eq!(images_per_group(2, 1), 1);
    }

    /// Forward and input gradient against candle's own convolution and autograd, on even and odd sizes, one
    /// image (every stage on all threads) or groups of images per GEMM (called directly: `applies` would route
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
        ] {
            let (n, c_in, c_out, h, w) = dims;
            let x = Var::randn(0f32, 1.0, (n, c_in, h, w), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)?;
            let reference = x.as_tensor().conv2d(&k, 1, 1, 1, 1)?;
            let up = Tensor::randn(0f32, 1.0, reference.shape(), &dev)?;
            let grad = (&reference * &up)?.sum_all()?.backward()?;
            let ours = forward(&flat(x.as_tensor())?, &flat(&k)?, dims);
            assert_close(&format!("forward {dims:?}"), &ours, &flat(&reference)?);
            let dx = input_grad(&flat(&up)?, &flat(&k)?, dims);
            let want = flat(grad.get(&x).unwrap())?;
            assert_close(&format!("input gradient {dims:?}"), &dx, &want);
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
    /// by hand: one image (stages on all threads), groups of two with a partial last one, odd planes.
    #[test]
    fn blocked_forward_equals_the_nchw_one_finished() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let lanes = 8;
        for (dims, relu) in [
            ((1, 8, 16, 6, 10), true),
            ((5, 16, 8, 3, 5), false),
            ((3, 8, 8, 7, 7), true),
        ] {
            let (n, c_in, c_out, h, w) = dims;
            let plane = h * w;
            let x = flat(&Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev)?)?;
            let k = flat(&Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)?)?;
            let residual = flat(&Tensor::randn(0f32, 1.0, (n, c_out, h, w), &dev)?)?;
            let bias: Vec<f32> = (0..c_out).map(|c| c as f32 * 0.25 - 1.0).collect();
            let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
            let want: Vec<f32> = forward(&x, &k, dims)
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
            let u = forward_weights(&k, (c_out, c_in));
            let blocked_x = to_blocked(&x, (c_in, plane), lanes);
            // SAFETY: `forward_blocked` writes every value.
            let got = unsafe {
                written_by(want.len(), |y| {
                    forward_blocked(&blocked_x, &u, dims, lanes, finish, y)
                })
            };
            assert_eq!(
                got,
                to_blocked(&want, (c_out, plane), lanes),
                "blocked forward {dims:?}"
            );
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
            (40, 300, 300, 9, 9),
        ] {
            let (n, c_in, c_out, h, w) = dims;
            let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev)?;
            let k = Var::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)?;
            let y = x.conv2d(k.as_tensor(), 1, 1, 1, 1)?;
            let up = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
            let want = flat((&y * &up)?.sum_all()?.backward()?.get(&k).unwrap())?;
            let got = weight_grad(&flat(&x)?, &flat(&up)?, dims);
            assert_close(&format!("weight gradient {dims:?}"), &got, &want);
        }
        Ok(())
    }
}
