//! Max-pooling with padding and a backward pass, which candle lacks for the ImageNet stem (3×3, stride 2,
//! padding 1: candle's max-pool has no padding and no backward unless kernel == stride).
//!
//! Padding counts as −∞ and ties go to the first maximum in row-major window order, as PyTorch does, so
//! gradients equal PyTorch's even on the many zeros a ReLU leaves. On the CPU the input may also be
//! channel-blocked, `[N, C/B, H, W, B]` (training on blocked tensors, `ops::channel_blocks`): the same taps
//! and rule per channel, the `B` channels of a pixel side by side.

use crate::ops::cpu_slice::{contiguous_f32, zeroed};
use crate::ops::isa::Isa;
use crate::ops::parallel::for_each_chunk;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool2d {
    /// The ImageNet stem's pool.
    pub const STEM: MaxPool2d = MaxPool2d {
        kernel: 3,
        stride: 2,
        padding: 1,
    };

    pub fn output_size(&self, input: usize) -> usize {
        (input + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (h, w) = match *x.dims() {
            [_, _, h, w, _] if x.device().is_cpu() => (h, w),
            _ => {
                let (_, _, h, w) = x.dims4()?;
                (h, w)
            }
        };
        // As PyTorch: a wider padding would leave windows with no tap inside the plane.
        if 2 * self.padding > self.kernel || self.stride == 0 {
            candle_core::bail!(
                "max-pool {self:?}: expected a padding of at most half the kernel and a stride ≥ 1"
            );
        }
        if h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            candle_core::bail!(
                "max-pool {self:?} needs an input of at least {0}×{0}, got {h}×{w}",
                self.kernel - 2 * self.padding
            );
        }
        if x.device().is_cpu() {
            // The CPU kernels index a plane in u32 (u32::MAX marks "no tap yet").
            if h * w >= u32::MAX as usize {
                candle_core::bail!("max-pool: a {h}×{w} plane has over 2³² values");
            }
            x.contiguous()?.apply_op1(*self)
        } else {
            // Other devices: forward through candle's pool on an input padded with −∞ (no backward yet).
            let p = self.padding;
            let x = pad_with(x, 2, p, f32::NEG_INFINITY)?;
            let x = pad_with(&x, 3, p, f32::NEG_INFINITY)?;
            x.max_pool2d_with_stride(self.kernel, self.stride)
        }
    }

    /// The index in its `h`×`w` plane of each output's maximum (first on ties), row by row into `argmax`
    /// (`oh·ow` long).
    ///
    /// The plane is first split by column into `stride` phases (phase `r` holds columns `r, r + s, …`), so
    /// that a tap read by a row of outputs is a contiguous run of one phase, and the taps are taken in window
    /// order, each over the whole row of outputs: the running maxima are independent lanes of branch-free
    /// selects that the compiler vectorises in each kernel set's entry point. ResNet-18's stem pool at batch 16,
    /// forward / backward: 55 / 62 ms with scalar taps per output row, 12 / 25 ms so with AVX-512 and 16 / 28 ms
    /// with AVX2 (AMD EPYC Zen 4, 2 threads; the portable build stays scalar, 48 / 61 ms).
    ///
    /// A plane of blocks of `lanes` channels (`[H, W, lanes]`, `lanes` > 1) goes to [`argmax_blocked_plane`]
    /// instead: `argmax` is then `oh·ow·lanes` long, the winning pixel of each output pixel's channels.
    fn argmax_plane(
        &self,
        (isa, lanes): (Isa, usize),
        src: &[f32],
        (h, w): (usize, usize),
        argmax: &mut [u32],
    ) {
        #[cfg(target_arch = "x86_64")]
        match (isa, lanes) {
            // SAFETY: the callers pass `Isa::current()` or one of `Isa::available()`: a set this CPU runs.
            (Isa::Avx512, 1) => return unsafe { x86::argmax_avx512(self, src, (h, w), argmax) },
            (Isa::Avx2, 1) => return unsafe { x86::argmax_avx2(self, src, (h, w), argmax) },
            (Isa::Avx512, 16) => {
                return unsafe { x86::blocked16_avx512(self, src, (h, w), argmax) }
            }
            (Isa::Avx2, 8) => return unsafe { x86::blocked8_avx2(self, src, (h, w), argmax) },
            _ => {}
        }
        let _ = isa;
        match lanes {
            8 => argmax_blocked_plane::<8>(self, src, (h, w), argmax),
            16 => argmax_blocked_plane::<16>(self, src, (h, w), argmax),
            _ => argmax_plane(self, src, (h, w), argmax),
        }
    }
}

thread_local! {
    /// A plane's winning pixels, per thread.
    static ARGMAX: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` with this thread's argmax buffer, `len` long.
fn with_argmax(len: usize, f: impl FnOnce(&mut [u32])) {
    ARGMAX.with_borrow_mut(|argmax| {
        argmax.resize(len, 0);
        f(argmax)
    })
}

/// `(planes, h, w, lanes)` of an NCHW input (`lanes` 1) or a channel-blocked one (blocks of 8 or 16).
fn plane_dims(shape: &Shape) -> Result<(usize, usize, usize, usize)> {
    match *shape.dims() {
        [n, blocks, h, w, lanes @ (8 | 16)] => Ok((n * blocks, h, w, lanes)),
        [n, c, h, w] => Ok((n * c, h, w, 1)),
        _ => candle_core::bail!(
            "max-pool: expected an input [N, C, H, W] or [N, C/B, H, W, B] (B 8 or 16), got {shape:?}"
        ),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{argmax_blocked_plane, argmax_plane, MaxPool2d};

    /// An entry point that compiles `$body` (one of the two argmax functions) with `$features`.
    macro_rules! entry {
        ($name:ident, $body:path, $features:literal) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                pool: &MaxPool2d,
                src: &[f32],
                hw: (usize, usize),
                argmax: &mut [u32],
            ) {
                $body(pool, src, hw, argmax)
            }
        };
    }
    entry!(argmax_avx2, argmax_plane, "avx2");
    entry!(argmax_avx512, argmax_plane, "avx512f");
    entry!(blocked8_avx2, argmax_blocked_plane::<8>, "avx2");
    entry!(blocked16_avx512, argmax_blocked_plane::<16>, "avx512f");
}

/// [`MaxPool2d::argmax_plane`]'s body, inlined into each kernel set's entry point.
#[inline(always)]
fn argmax_plane(pool: &MaxPool2d, src: &[f32], (h, w): (usize, usize), argmax: &mut [u32]) {
    let (k, s, p) = (pool.kernel, pool.stride, pool.padding);
    let (oh, ow) = (pool.output_size(h), pool.output_size(w));
    let phase_len = w.div_ceil(s);
    // phased[(y·s + r)·phase_len + j] = src[y·w + j·s + r]
    let mut phased = vec![f32::NEG_INFINITY; h * s * phase_len];
    for (row, out) in src
        .chunks_exact(w)
        .zip(phased.chunks_exact_mut(s * phase_len))
    {
        for (r, phase) in out.chunks_exact_mut(phase_len).enumerate() {
            for (o, &v) in phase.iter_mut().zip(row.iter().skip(r).step_by(s)) {
                *o = v;
            }
        }
    }
    let mut best = vec![f32::NEG_INFINITY; ow];
    for (oy, best_idx) in argmax.chunks_exact_mut(ow).enumerate().take(oh) {
        best.fill(f32::NEG_INFINITY);
        best_idx.fill(u32::MAX);
        for ky in 0..k {
            let Some(y) = (oy * s + ky).checked_sub(p).filter(|&y| y < h) else {
                continue;
            };
            for kx in 0..k {
                // Outputs whose tap `kx` is inside the row: `p ≤ ox·s + kx < w + p`; the tap's column
                // `ox·s + kx − p` is entry `ox + m` of phase `r`, with `kx − p = m·s + r`.
                let lo = p.saturating_sub(kx).div_ceil(s);
                let hi = ((w + p).saturating_sub(kx)).div_ceil(s).min(ow);
                if lo >= hi {
                    continue;
                }
                let q = kx as isize - p as isize;
                let (r, m) = (q.rem_euclid(s as isize) as usize, q.div_euclid(s as isize));
                let phase = &phased[(y * s + r) * phase_len..][..phase_len];
                let first = (lo as isize + m) as usize;
                let taps = &phase[first..first + (hi - lo)];
                // `lo·s + kx ≥ p` by the choice of `lo`; the index fits (see `forward`).
                let mut idx = (y * w + lo * s + kx - p) as u32;
                let outputs = best[lo..hi].iter_mut().zip(&mut best_idx[lo..hi]);
                for ((b, i), &v) in outputs.zip(taps) {
                    // Strict `>`: the first maximum wins ties; NaN propagates (the last NaN wins), as in
                    // PyTorch; an output's first tap is always taken.
                    let take = (v > *b) | v.is_nan() | (*i == u32::MAX);
                    *b = if take { v } else { *b };
                    *i = if take { idx } else { *i };
                    idx = idx.wrapping_add(s as u32);
                }
            }
        }
    }
}

/// [`argmax_plane`] on one plane of blocks `[H, W, L]`: for each output pixel and lane, the index in the plane
/// of the input pixel that holds the maximum, by the same taps in the same order and the same rule; the `L`
/// running maxima of a pixel are independent lanes of selects, which each kernel set's entry point vectorises.
#[inline(always)]
fn argmax_blocked_plane<const L: usize>(
    pool: &MaxPool2d,
    src: &[f32],
    (h, w): (usize, usize),
    argmax: &mut [u32],
) {
    let (k, s, p) = (pool.kernel, pool.stride, pool.padding);
    let ow = pool.output_size(w);
    // The taps of output row or column `o` inside a plane side of `side`.
    let taps = |o: usize, side: usize| (o * s).saturating_sub(p)..(o * s + k - p).min(side);
    for (oy, row) in argmax.chunks_exact_mut(ow * L).enumerate() {
        let rows = taps(oy, h);
        for (ox, out) in row.chunks_exact_mut(L).enumerate() {
            let cols = taps(ox, w);
            let mut best = [f32::NEG_INFINITY; L];
            let mut arg = [u32::MAX; L];
            let mut first = true;
            for y in rows.clone() {
                for x in cols.clone() {
                    // The index fits (see `forward`).
                    let pixel = (y * w + x) as u32;
                    let v: &[f32; L] = src[pixel as usize * L..][..L].try_into().expect("L values");
                    for l in 0..L {
                        let take = (v[l] > best[l]) | v[l].is_nan() | first;
                        best[l] = if take { v[l] } else { best[l] };
                        arg[l] = if take { pixel } else { arg[l] };
                    }
                    first = false;
                }
            }
            out.copy_from_slice(&arg);
        }
    }
}

fn pad_with(x: &Tensor, dim: usize, pad: usize, value: f32) -> Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    let mut dims = x.dims().to_vec();
    dims[dim] = pad;
    let border = Tensor::full(value, dims, x.device())?.to_dtype(x.dtype())?;
    Tensor::cat(&[&border, x, &border], dim)
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d-padded"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, "max-pool forward")?;
        let (planes, h, w, l) = plane_dims(layout.shape())?;
        let (oh, ow) = (self.output_size(h), self.output_size(w));
        let mut out = zeroed(planes * oh * ow * l);
        let isa = (Isa::current(), l);
        for_each_chunk(&mut out, oh * ow * l, |j, o| {
            let plane = &src[j * h * w * l..][..h * w * l];
            with_argmax(oh * ow * l, |argmax| {
                self.argmax_plane(isa, plane, (h, w), argmax);
                // Output pixel by pixel: lane `k` of a pixel is channel `k` of its block.
                for (o, pixel) in o.chunks_exact_mut(l).zip(argmax.chunks_exact(l)) {
                    for (k, (o, &i)) in o.iter_mut().zip(pixel).enumerate() {
                        *o = plane[i as usize * l + k];
                    }
                }
            })
        });
        let mut dims = layout.shape().dims().to_vec();
        (dims[2], dims[3]) = (oh, ow);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg.apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPoolGrad(*self))?;
        Ok(Some(grad))
    }
}

/// Routes each output gradient to the input cell that won the max (recomputed from the input).
struct MaxPoolGrad(MaxPool2d);

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "max-pool2d-padded-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s1, l1, "max-pool backward input")?;
        let grad_out = contiguous_f32(s2, l2, "max-pool backward gradient")?;
        let (planes, h, w, l) = plane_dims(l1.shape())?;
        let (oh, ow) = (self.0.output_size(h), self.0.output_size(w));
        if grad_out.len() != planes * oh * ow * l {
            candle_core::bail!(
                "max-pool backward: a gradient of {} values for an input {:?}",
                grad_out.len(),
                l1.shape()
            );
        }
        let mut grad_in = zeroed(src.len());
        let isa = (Isa::current(), l);
        for_each_chunk(&mut grad_in, h * w * l, |j, gi| {
            let plane = &src[j * h * w * l..][..h * w * l];
            let go = &grad_out[j * oh * ow * l..][..oh * ow * l];
            with_argmax(oh * ow * l, |argmax| {
                self.0.argmax_plane(isa, plane, (h, w), argmax);
                for (go, pixel) in go.chunks_exact(l).zip(argmax.chunks_exact(l)) {
                    for (k, (&g, &i)) in go.iter().zip(pixel).enumerate() {
                        gi[i as usize * l + k] += g;
                    }
                }
            })
        });
        Ok((CpuStorage::F32(grad_in), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_backward_by_hand_on_a_4x4_plane() -> Result<()> {
        // 4×4 input, 3×3 windows, stride 2, padding 1 → 2×2 output. Windows (rows × cols, −∞ outside):
        // (0,0): rows −1..1, cols −1..1   (0,1): rows −1..1, cols 1..3
        // (1,0): rows 1..3, cols −1..1    (1,1): rows 1..3, cols 1..3
        let x = Var::new(
            &[[[
                [1f32, 2., 0., 0.],
                [5., 5., 0., 7.],
                [0., 0., 0., 0.],
                [0., 3., 0., 0.],
            ]]],
            &Device::Cpu,
        )?;
        let y = MaxPool2d::STEM.forward(x.as_tensor())?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![5., 7., 5., 7.]);
        // Gradient weights 1, 10, 100, 1000 per output; the tie (5 at (1,0) and (1,1)) goes to the first, (1,0).
        let weights = Tensor::new(&[[[[1f32, 10.], [100., 1000.]]]], &Device::Cpu)?;
        let grads = (y * weights)?.sum_all()?.backward()?;
        let g = grads.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        let mut expected = vec![0f32; 16];
        expected[4] = 1.0 + 100.0; // (1,0) wins windows (0,0) and (1,0)
        expected[7] = 10.0 + 1000.0; // (1,3) wins windows (0,1) and (1,1)
        assert_eq!(g, expected);
        Ok(())
    }

    /// The definition, output by output: each window's taps in row-major order, the first maximum kept (a
    /// later NaN taking over), padding never chosen.
    fn argmax_by_definition(pool: &MaxPool2d, src: &[f32], (h, w): (usize, usize)) -> Vec<usize> {
        let (oh, ow) = (pool.output_size(h), pool.output_size(w));
        let mut out = Vec::new();
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best: Option<(f32, usize)> = None;
                for ky in 0..pool.kernel {
                    for kx in 0..pool.kernel {
                        let y = (oy * pool.stride + ky) as isize - pool.padding as isize;
                        let x = (ox * pool.stride + kx) as isize - pool.padding as isize;
                        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                            continue;
                        }
                        let i = y as usize * w + x as usize;
                        let v = src[i];
                        if best.is_none_or(|(b, _)| v > b || v.is_nan()) {
                            best = Some((v, i));
                        }
                    }
                }
                out.push(best.expect("a window with a tap").1);
            }
        }
        out
    }

    /// Stem-like pools on odd and even planes, on data with many ties (a ReLU's zeros, few distinct values), a
    /// NaN and −∞: the winning index of every window equals the definition's, forward and backward.
    #[test]
    fn argmax_equals_the_definition_with_ties_nan_and_infinity() -> Result<()> {
        for (pool, (h, w)) in [
            (MaxPool2d::STEM, (9, 12)),
            (MaxPool2d::STEM, (8, 7)),
            (
                MaxPool2d {
                    kernel: 2,
                    stride: 2,
                    padding: 1,
                },
                (7, 6),
            ),
            (
                MaxPool2d {
                    kernel: 3,
                    stride: 1,
                    padding: 0,
                },
                (5, 5),
            ),
        ] {
            // One plane per channel, each with its own ties, NaN and −∞.
            let channel = |c: usize| {
                let mut src: Vec<f32> = (0..h * w)
                    .map(|i| (((i + 3 * c) * 7919 % 13) as f32 - 6.0).max(0.0))
                    .collect();
                src[(h * w / 2 + c) % (h * w)] = f32::NAN;
                src[(1 + 5 * c) % (h * w)] = f32::NEG_INFINITY;
                src
            };
            for isa in Isa::available() {
                // NCHW planes, and planes of blocks of 8 and 16 channels (each channel's winner per lane).
                for lanes in [1, 8, 16] {
                    let planes: Vec<Vec<f32>> = (0..lanes).map(channel).collect();
                    let src: Vec<f32> = (0..h * w * lanes)
                        .map(|j| planes[j % lanes][j / lanes])
                        .collect();
                    let expected: Vec<Vec<usize>> = planes
                        .iter()
                        .map(|plane| argmax_by_definition(&pool, plane, (h, w)))
                        .collect();
                    let mut ours = vec![0u32; expected[0].len() * lanes];
                    pool.argmax_plane((isa, lanes), &src, (h, w), &mut ours);
                    for (j, &i) in ours.iter().enumerate() {
                        assert_eq!(
                            i as usize,
                            expected[j % lanes][j / lanes],
                            "{pool:?} on {h}×{w} with {isa}, blocks of {lanes}: output {j}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn padding_wider_than_half_the_kernel_is_an_error() {
        let pool = MaxPool2d {
            kernel: 2,
            stride: 1,
            padding: 2,
        };
        let x = Tensor::zeros((1, 1, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = pool.forward(&x).unwrap_err().to_string();
        assert!(e.contains("at most half the kernel"), "{e}");
    }

    #[test]
    fn output_size_of_the_imagenet_stem() {
        assert_eq!(MaxPool2d::STEM.output_size(112), 56);
        assert_eq!(MaxPool2d::STEM.output_size(113), 57);
        assert_eq!(MaxPool2d::STEM.output_size(1), 1);
    }

    #[test]
    fn equals_candles_pool_where_candle_has_a_backward() -> Result<()> {
        // kernel == stride, no padding: candle's own op is the reference (random data, so no ties).
        // candle 0.11's backward divides each gradient by the window area (it averages the max mask);
        // PyTorch routes the whole gradient to the maximum, as we do, hence the factor 4 below.
        let pool = MaxPool2d {
            kernel: 2,
            stride: 2,
            padding: 0,
        };
        let x = Var::randn(0f32, 1.0, (2, 3, 6, 8), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (2, 3, 3, 4), &Device::Cpu)?;
        let ours = pool.forward(x.as_tensor())?;
        let theirs = x.as_tensor().max_pool2d(2)?;
        assert_eq!(
            ours.flatten_all()?.to_vec1::<f32>()?,
            theirs.flatten_all()?.to_vec1::<f32>()?
        );
        let g_ours = (ours * &w)?
            .sum_all()?
            .backward()?
            .get(&x)
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let g_theirs = (theirs * &w)?
            .sum_all()?
            .backward()?
            .get(&x)
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let g_theirs_scaled: Vec<f32> = g_theirs.iter().map(|g| g * 4.0).collect();
        assert_eq!(g_ours, g_theirs_scaled);
        Ok(())
    }
}
