//! BatchNorm's element passes over one chunk of [`super::batch_norm::Channels`] (normalize, the two kinds of
//! per-channel sums, the input gradient), in explicit vectors of each kernel set.
//!
//! Why not plain loops over `[f32; 16]` lane arrays: built for the x86-64 baseline they ran as SSE code with
//! scalar stores and NaN fix-ups around `f32::max` (~13 % of a ResNet-20 training step), and compiled with
//! AVX-512 `target_feature`s LLVM turned them into masked loads and lane inserts (the step 0.90×). Here every
//! value goes through the same operations in the same order as the scalar tail (no FMA), so the results do
//! not depend on the kernel set.

use crate::ops::isa::Isa;
use crate::ops::simd::{kernel_set_dispatch, Simd};
use std::mem::MaybeUninit;

/// Values per lane array: element `i` of a chunk uses lane `i mod LANES` of each per-channel parameter and
/// adds into lane `i mod LANES` of each partial sum. A multiple of every kernel set's vector and of every
/// channel block (8, 16), so one lane array holds the block's channels whole.
pub(crate) const LANES: usize = 16;

/// One value per lane.
pub(crate) type LaneArray = [f32; LANES];

/// One chunk's pass.
pub(crate) enum Chunk<'a> {
    /// `out = max((x · scale + shift) (+ residual), floor)`.
    Normalize {
        x: &'a [f32],
        residual: Option<&'a [f32]>,
        out: &'a mut [MaybeUninit<f32>],
        scale: &'a LaneArray,
        shift: &'a LaneArray,
        floor: f32,
    },
    /// `sums += (d, d²)`, `d = x − shift`.
    Statistics {
        x: &'a [f32],
        shift: &'a LaneArray,
        sums: (&'a mut LaneArray, &'a mut LaneArray),
    },
    /// `sums += (g · (x − mean), g)`, `g = dy` masked by the ReLU's output `y` when `relu`.
    GradientSums {
        xgy: (&'a [f32], &'a [f32], &'a [f32]),
        mean: &'a LaneArray,
        relu: bool,
        sums: (&'a mut LaneArray, &'a mut LaneArray),
    },
    /// `out = k · (g − mean_dbeta − (x − mean) · inv_std · mean_dgamma)`, `g` as in `GradientSums`.
    InputGradient {
        xgy: (&'a [f32], &'a [f32], &'a [f32]),
        out: &'a mut [MaybeUninit<f32>],
        params: &'a GradientParams,
        relu: bool,
    },
}

/// The per-lane values of the input-gradient pass.
pub(crate) struct GradientParams {
    pub k: LaneArray,
    pub inv_std: LaneArray,
    pub mean: LaneArray,
    pub mean_dgamma: LaneArray,
    pub mean_dbeta: LaneArray,
}

/// Runs `chunk` with the kernel set `isa` (one this CPU runs). Panics if the chunk's slices differ in length.
pub(crate) fn run(isa: Isa, chunk: Chunk) {
    check_lengths(&chunk);
    // SAFETY: `isa` is `Isa::current()`: a set this CPU runs; the lengths are checked.
    unsafe { run_on_isa(isa, chunk) }
}

fn check_lengths(chunk: &Chunk) {
    let (n, others) = match chunk {
        Chunk::Normalize {
            x, residual, out, ..
        } => (
            x.len(),
            [out.len(), residual.map_or(x.len(), <[f32]>::len), x.len()],
        ),
        Chunk::Statistics { x, .. } => (x.len(), [x.len(); 3]),
        Chunk::GradientSums { xgy: (x, g, y), .. } => (x.len(), [g.len(), y.len(), x.len()]),
        Chunk::InputGradient {
            xgy: (x, g, y),
            out,
            ..
        } => (x.len(), [g.len(), y.len(), out.len()]),
    };
    assert!(
        others.iter().all(|&m| m == n),
        "batch-norm chunk of {n} values with operands of {others:?}"
    );
}

kernel_set_dispatch!(Chunk);

/// # Safety
/// The CPU runs `S`; the chunk's slices are equally long.
#[inline(always)]
unsafe fn run_on<S: Simd>(chunk: Chunk) {
    unsafe {
        match chunk {
            Chunk::Normalize {
                x,
                residual,
                out,
                scale,
                shift,
                floor,
            } => normalize::<S>(x, residual, out, (scale, shift), floor),
            Chunk::Statistics { x, shift, sums } => statistics::<S>(x, shift, sums),
            Chunk::GradientSums {
                xgy,
                mean,
                relu: true,
                sums,
            } => gradient_sums::<S, true>(xgy, mean, sums),
            Chunk::GradientSums {
                xgy,
                mean,
                relu: false,
                sums,
            } => gradient_sums::<S, false>(xgy, mean, sums),
            Chunk::InputGradient {
                xgy,
                out,
                params,
                relu: true,
            } => input_gradient::<S, true>(xgy, out, params),
            Chunk::InputGradient {
                xgy,
                out,
                params,
                relu: false,
            } => input_gradient::<S, false>(xgy, out, params),
        }
    }
}

/// A lane array as vectors: `[0]` its first `S::LANES` values, `[1]` its last (the same vector where
/// `S::LANES` is `LANES`).
#[inline(always)]
unsafe fn vectors<S: Simd>(values: &LaneArray) -> [S; 2] {
    debug_assert!(LANES == S::LANES || LANES == 2 * S::LANES);
    unsafe {
        [
            S::load(values.as_ptr()),
            S::load(values.as_ptr().add(LANES - S::LANES)),
        ]
    }
}

/// Vectors per lane array.
const fn per_array<S: Simd>() -> usize {
    LANES / S::LANES
}

/// The ReLU's gradient mask where `RELU`.
#[inline(always)]
fn masked<const RELU: bool>(g: f32, y: f32) -> f32 {
    if RELU && y <= 0.0 {
        0.0
    } else {
        g
    }
}

#[inline(always)]
unsafe fn normalize<S: Simd>(
    x: &[f32],
    residual: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
    (scale, shift): (&LaneArray, &LaneArray),
    floor: f32,
) {
    let n = x.len();
    let whole = n / LANES * LANES;
    let o = out.as_mut_ptr().cast::<f32>();
    unsafe {
        let (sc, sh, fl) = (vectors::<S>(scale), vectors::<S>(shift), S::splat(&floor));
        for i in (0..whole).step_by(LANES) {
            for j in 0..per_array::<S>() {
                let at = i + j * S::LANES;
                let mut v = S::load(x.as_ptr().add(at)).mul(sc[j]).add(sh[j]);
                if let Some(r) = residual {
                    v = v.add(S::load(r.as_ptr().add(at)));
                }
                v.max(fl).store(o.add(at));
            }
        }
    }
    for i in whole..n {
        let l = i % LANES;
        let mut v = x[i] * scale[l] + shift[l];
        if let Some(r) = residual {
            v += r[i];
        }
        out[i].write(v.max(floor));
    }
}

/// The vector partial sums back into the lane arrays `(a, b)` they were loaded from.
#[inline(always)]
unsafe fn store_sums<S: Simd>(
    (sa, sb): ([S; 2], [S; 2]),
    (a, b): (&mut LaneArray, &mut LaneArray),
) {
    for j in 0..per_array::<S>() {
        unsafe {
            sa[j].store(a.as_mut_ptr().add(j * S::LANES));
            sb[j].store(b.as_mut_ptr().add(j * S::LANES));
        }
    }
}

/// Adds `terms(at)` of every vector of the chunk (`at` its first element) into the lane arrays `(a, b)`, and
/// `scalar(i)` of every element of the tail (element `i` into lane `i mod LANES`).
#[inline(always)]
unsafe fn lane_sums<S: Simd>(
    n: usize,
    (a, b): (&mut LaneArray, &mut LaneArray),
    terms: impl Fn(usize, usize) -> (S, S),
    scalar: impl Fn(usize) -> (f32, f32),
) {
    let whole = n / LANES * LANES;
    unsafe {
        let (mut sa, mut sb) = (vectors::<S>(a), vectors::<S>(b));
        for i in (0..whole).step_by(LANES) {
            for j in 0..per_array::<S>() {
                let (ta, tb) = terms(i + j * S::LANES, j);
                sa[j] = sa[j].add(ta);
                sb[j] = sb[j].add(tb);
            }
        }
        store_sums((sa, sb), (a, b));
    }
    for i in whole..n {
        let (ta, tb) = scalar(i);
        a[i % LANES] += ta;
        b[i % LANES] += tb;
    }
}

#[inline(always)]
unsafe fn statistics<S: Simd>(
    x: &[f32],
    shift: &LaneArray,
    sums: (&mut LaneArray, &mut LaneArray),
) {
    unsafe {
        let sh = vectors::<S>(shift);
        let vector = |at: usize, j: usize| {
            let d = S::load(x.as_ptr().add(at)).sub(sh[j]);
            (d, d.mul(d))
        };
        let scalar = |i: usize| {
            let d = x[i] - shift[i % LANES];
            (d, d * d)
        };
        lane_sums(x.len(), sums, vector, scalar);
    }
}

#[inline(always)]
unsafe fn gradient_sums<S: Simd, const RELU: bool>(
    (x, g, y): (&[f32], &[f32], &[f32]),
    mean: &LaneArray,
    sums: (&mut LaneArray, &mut LaneArray),
) {
    unsafe {
        let m = vectors::<S>(mean);
        let vector = |at: usize, j: usize| {
            let mut gv = S::load(g.as_ptr().add(at));
            if RELU {
                gv = gv.where_positive(S::load(y.as_ptr().add(at)));
            }
            (gv.mul(S::load(x.as_ptr().add(at)).sub(m[j])), gv)
        };
        let scalar = |i: usize| {
            let gv = masked::<RELU>(g[i], y[i]);
            (gv * (x[i] - mean[i % LANES]), gv)
        };
        lane_sums(x.len(), sums, vector, scalar);
    }
}

#[inline(always)]
unsafe fn input_gradient<S: Simd, const RELU: bool>(
    (x, g, y): (&[f32], &[f32], &[f32]),
    out: &mut [MaybeUninit<f32>],
    p: &GradientParams,
) {
    let n = x.len();
    let whole = n / LANES * LANES;
    let o = out.as_mut_ptr().cast::<f32>();
    unsafe {
        let (k, inv, m) = (
            vectors::<S>(&p.k),
            vectors::<S>(&p.inv_std),
            vectors::<S>(&p.mean),
        );
        let (mdg, mdb) = (vectors::<S>(&p.mean_dgamma), vectors::<S>(&p.mean_dbeta));
        for i in (0..whole).step_by(LANES) {
            for j in 0..per_array::<S>() {
                let at = i + j * S::LANES;
                let mut gv = S::load(g.as_ptr().add(at));
                if RELU {
                    gv = gv.where_positive(S::load(y.as_ptr().add(at)));
                }
                let xhat_dgamma = S::load(x.as_ptr().add(at))
                    .sub(m[j])
                    .mul(inv[j])
                    .mul(mdg[j]);
                k[j].mul(gv.sub(mdb[j]).sub(xhat_dgamma)).store(o.add(at));
            }
        }
    }
    for i in whole..n {
        let l = i % LANES;
        let gv = masked::<RELU>(g[i], y[i]);
        let xhat_dgamma = (x[i] - p.mean[l]) * p.inv_std[l] * p.mean_dgamma[l];
        out[i].write(p.k[l] * (gv - p.mean_dbeta[l] - xhat_dgamma));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values around 0 (some exactly 0 and negative, for the ReLU masks), and a NaN.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match (i * 7 + seed) % 11 {
                0 => 0.0,
                5 if i == 37 => f32::NAN,
                k => (k as f32 - 5.5) * 0.37 + (i as f32 * 0.013).sin(),
            })
            .collect()
    }

    fn lanes(seed: f32) -> LaneArray {
        std::array::from_fn(|l| 0.5 + seed * l as f32 * 0.11)
    }

    fn same_bits(what: &str, ours: &[f32], expected: &[f32]) {
        for (i, (a, b)) in ours.iter().zip(expected).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "{what}: element {i} {a} vs {b}");
        }
    }

    /// Every pass on every kernel set this CPU runs gives the bits of the formula computed value by value (the
    /// documented order of operations, no FMA), vector part and tail alike (lengths 16·k + 0..15).
    #[test]
    fn every_pass_on_every_kernel_set_equals_the_scalar_formula() {
        let (scale, shift) = (lanes(1.0), lanes(-0.7));
        let params = GradientParams {
            k: lanes(0.3),
            inv_std: lanes(1.3),
            mean: lanes(-0.2),
            mean_dgamma: lanes(0.05),
            mean_dbeta: lanes(-0.02),
        };
        for n in [7, 16, 49, 64 + 3, 1024 + 15] {
            let (x, g, y, r) = (values(n, 0), values(n, 3), values(n, 5), values(n, 8));
            let at = |v: &LaneArray, i: usize| v[i % LANES];
            for isa in Isa::available() {
                let what = |pass: &str| format!("{pass}, {n} values, {isa:?}");
                for (residual, floor) in [(None, 0.0), (Some(&r[..]), f32::NEG_INFINITY)] {
                    let mut out = vec![MaybeUninit::uninit(); n];
                    let (scale, shift) = (&scale, &shift);
                    let x = &x[..];
                    run(
                        isa,
                        Chunk::Normalize {
                            x,
                            residual,
                            out: &mut out,
                            scale,
                            shift,
                            floor,
                        },
                    );
                    let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
                    let expected: Vec<f32> = (0..n)
                        .map(|i| {
                            let v = x[i] * at(scale, i) + at(shift, i);
                            // The residual-free pass adds nothing (+0.0 would turn −0.0 into 0.0).
                            residual.map_or(v, |r| v + r[i]).max(floor)
                        })
                        .collect();
                    same_bits(&what("normalize"), &out, &expected);
                }
                let (mut a, mut b) = (lanes(0.1), lanes(0.2));
                run(
                    isa,
                    Chunk::Statistics {
                        x: &x,
                        shift: &shift,
                        sums: (&mut a, &mut b),
                    },
                );
                let (mut ea, mut eb) = (lanes(0.1), lanes(0.2));
                for i in 0..n {
                    let d = x[i] - at(&shift, i);
                    ea[i % LANES] += d;
                    eb[i % LANES] += d * d;
                }
                same_bits(&what("statistics"), &[a, b].concat(), &[ea, eb].concat());
                for relu in [false, true] {
                    let mask = |i: usize| if relu && y[i] <= 0.0 { 0.0 } else { g[i] };
                    let (mut a, mut b) = (lanes(0.1), lanes(0.2));
                    let xgy = (&x[..], &g[..], &y[..]);
                    run(
                        isa,
                        Chunk::GradientSums {
                            xgy,
                            mean: &params.mean,
                            relu,
                            sums: (&mut a, &mut b),
                        },
                    );
                    let (mut ea, mut eb) = (lanes(0.1), lanes(0.2));
                    for i in 0..n {
                        ea[i % LANES] += mask(i) * (x[i] - at(&params.mean, i));
                        eb[i % LANES] += mask(i);
                    }
                    same_bits(&what("gradient sums"), &[a, b].concat(), &[ea, eb].concat());
                    let mut out = vec![MaybeUninit::uninit(); n];
                    run(
                        isa,
                        Chunk::InputGradient {
                            xgy,
                            out: &mut out,
                            params: &params,
                            relu,
                        },
                    );
                    let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
                    let expected: Vec<f32> = (0..n)
                        .map(|i| {
                            let xhat_dgamma = (x[i] - at(&params.mean, i))
                                * at(&params.inv_std, i)
                                * at(&params.mean_dgamma, i);
                            at(&params.k, i) * (mask(i) - at(&params.mean_dbeta, i) - xhat_dgamma)
                        })
                        .collect();
                    same_bits(&what("input gradient"), &out, &expected);
                }
            }
        }
    }
}
