//! The blocked layout's max pool (the ImageNet stem's) and option-A shortcut (subsample, zero channels).

use super::layout::{Blocked, BlockedSlice};
use crate::ops::cpu_slice::Scratch;
use crate::ops::isa::Isa;
use crate::ops::max_pool::MaxPool2d;
use crate::ops::parallel::for_each_chunk;
use candle_core::Result;
use std::mem::MaybeUninit;

/// `pool` over each plane; windows are clipped to the plane (PyTorch pads with −∞).
pub fn max_pool(x: &Blocked, pool: &MaxPool2d) -> Result<Blocked> {
    let (k, s, p, l) = (pool.kernel, pool.stride, pool.padding, x.lanes);
    if x.h + 2 * p < k || x.w + 2 * p < k || s == 0 || 2 * p > k {
        candle_core::bail!(
            "max pool {k}×{k}/{s} (padding {p}) on a {}×{} plane",
            x.h,
            x.w
        );
    }
    let (oh, ow) = (pool.output_size(x.h), pool.output_size(x.w));
    let isa = Isa::current();
    let fill = |data: &mut [MaybeUninit<f32>]| {
        for_each_chunk(data, oh * ow * l, |block, dst| {
            let src = &x.data[block * x.h * x.w * l..][..x.h * x.w * l];
            let job = (src, (x.h, x.w), dst, (k, s, p));
            #[cfg(target_arch = "x86_64")]
            match (isa, l) {
                // SAFETY: `Isa::current()` is a set this CPU runs.
                (Isa::Avx512, 16) => return unsafe { x86::max_plane16_avx512(job) },
                (Isa::Avx2, 8) => return unsafe { x86::max_plane8_avx2(job) },
                _ => {}
            }
            let _ = isa;
            match l {
                8 => max_plane::<8>(job),
                16 => max_plane::<16>(job),
                _ => unreachable!("blocks of 8 or 16 lanes"),
            }
        })
    };
    // SAFETY: `max_plane` writes every output pixel of its plane, and the planes cover the output.
    let data = unsafe { Scratch::written_by(x.n * x.c * oh * ow, fill) };
    Ok(Blocked {
        data,
        n: x.n,
        c: x.c,
        h: oh,
        w: ow,
        lanes: l,
    })
}

/// A plane's pool: source, its size, destination, (kernel, stride, padding).
type Plane<'a> = (
    &'a [f32],
    (usize, usize),
    &'a mut [MaybeUninit<f32>],
    (usize, usize, usize),
);

/// One plane `[H, W, L]` into `dst` (`[H', W', L]`), each window clipped to the plane; compiled in each kernel
/// set's entry point, where a pixel's `L` maxima are one or two vector registers. (Compiled for the baseline
/// x86-64 alone, with a division per output pixel, the stem's pool of ResNet-50 at batch 1 took 309 µs, three
/// times ONNX Runtime's.) A NaN input is passed over, as by `f32::max`.
#[inline(always)]
fn max_plane<const L: usize>((src, (h, w), dst, (k, s, p)): Plane) {
    let ow = dst.len() / L / ((h + 2 * p - k) / s + 1);
    let clip = |o: usize, side: usize| (o * s).saturating_sub(p)..(o * s + k - p).min(side);
    for (oy, out_row) in dst.chunks_exact_mut(ow * L).enumerate() {
        let rows = clip(oy, h);
        for (ox, out) in out_row.chunks_exact_mut(L).enumerate() {
            let cols = clip(ox, w);
            let mut m = [f32::NEG_INFINITY; L];
            for iy in rows.clone() {
                let row = &src[(iy * w + cols.start) * L..(iy * w + cols.end) * L];
                for v in row.chunks_exact(L) {
                    for (m, &v) in m.iter_mut().zip(v) {
                        *m = if v > *m { v } else { *m };
                    }
                }
            }
            out.iter_mut().zip(m).for_each(|(o, m)| _ = o.write(m));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{max_plane, Plane};

    macro_rules! entry {
        ($name:ident, $lanes:literal, $features:literal) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(job: Plane) {
                max_plane::<$lanes>(job)
            }
        };
    }
    entry!(max_plane8_avx2, 8, "avx2");
    entry!(max_plane16_avx512, 16, "avx512f");
}

/// `x[:, :, ::stride, ::stride]` with `before` zero channels in front and `after` behind (option A).
pub fn zero_pad_shortcut(
    x: BlockedSlice,
    stride: usize,
    before: usize,
    after: usize,
) -> Result<Blocked> {
    let (c, (oh, ow)) = zero_pad_dims(x, stride, before, after)?;
    let mut data = Scratch::zeroed(x.n * c * oh * ow);
    zero_pad_into(x, stride, before, c, &mut data);
    Ok(Blocked {
        data,
        n: x.n,
        c,
        h: oh,
        w: ow,
        lanes: x.lanes,
    })
}

/// [`zero_pad_shortcut`] into a plain vector (a training tensor's storage), with its `(c, h, w)`.
pub fn zero_pad_shortcut_values(
    x: BlockedSlice,
    stride: usize,
    before: usize,
    after: usize,
) -> Result<(Vec<f32>, (usize, usize, usize))> {
    let (c, (oh, ow)) = zero_pad_dims(x, stride, before, after)?;
    let mut data = vec![0f32; x.n * c * oh * ow];
    zero_pad_into(x, stride, before, c, &mut data);
    Ok((data, (c, oh, ow)))
}

/// The output's channels and plane, checked.
fn zero_pad_dims(
    x: BlockedSlice,
    stride: usize,
    before: usize,
    after: usize,
) -> Result<(usize, (usize, usize))> {
    let (l, c) = (x.lanes, x.c + before + after);
    if !c.is_multiple_of(l) || stride == 0 {
        candle_core::bail!("option-A shortcut to {c} channels: not blocks of {l}");
    }
    Ok((c, (x.h.div_ceil(stride), x.w.div_ceil(stride))))
}

/// Fills the zeroed output `data` (`c` channels) of [`zero_pad_shortcut`].
fn zero_pad_into(x: BlockedSlice, stride: usize, before: usize, c: usize, data: &mut [f32]) {
    let l = x.lanes;
    let (oh, ow) = (x.h.div_ceil(stride), x.w.div_ceil(stride));
    for_each_chunk(&mut data[..], oh * ow * l, |block, dst| {
        let (img, cb) = (block / (c / l), block % (c / l));
        let pixel = |ch: usize, o: usize| {
            let (y, xi) = ((o / ow) * stride, (o % ow) * stride);
            (img * x.c / l + ch / l) * x.h * x.w * l + (y * x.w + xi) * l + ch % l
        };
        // Whole blocks where the zero channels are whole blocks: one copy per pixel.
        if before.is_multiple_of(l) {
            let Some(src_block) = (cb * l).checked_sub(before).filter(|&ch| ch < x.c) else {
                return;
            };
            for (o, px) in dst.chunks_exact_mut(l).enumerate() {
                px.copy_from_slice(&x.data[pixel(src_block, o)..][..l]);
            }
            return;
        }
        for lane in 0..l {
            let Some(ch) = (cb * l + lane).checked_sub(before).filter(|&ch| ch < x.c) else {
                continue;
            };
            for (o, px) in dst.chunks_exact_mut(l).enumerate() {
                px[lane] = x.data[pixel(ch, o)];
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::zero_pad_shortcut::ZeroPadShortcut;
    use candle_core::{Device, Tensor};

    fn assert_same(ours: &Blocked, expected: &Tensor) {
        let diff = (ours.to_nchw().unwrap() - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    /// Both block widths (NCHW8c and NCHW16c), whatever this CPU runs: the layout code has no SIMD.
    #[test]
    fn max_pool_and_option_a_equal_the_nchw_ops_in_blocks_of_8_and_16() {
        let x = Tensor::randn(0f32, 1.0, (3, 32, 9, 9), &Device::Cpu).unwrap();
        for lanes in [8, 16] {
            let b = Blocked::from_nchw(&x, lanes).unwrap();
            assert_same(&b, &x);
            assert_same(
                &max_pool(&b, &MaxPool2d::STEM).unwrap(),
                &MaxPool2d::STEM.forward(&x).unwrap(),
            );
            // 32 → 64 channels (16 zeros each side: whole blocks of 8 and 16) and 32 → 48 (8 each side).
            for (before, after) in [(16, 16), (8, 8)] {
                if !(x.dim(1).unwrap() + before + after).is_multiple_of(lanes) {
                    continue;
                }
                let reference = ZeroPadShortcut {
                    stride: 2,
                    before,
                    after,
                }
                .forward(&x)
                .unwrap();
                assert_same(
                    &zero_pad_shortcut(b.slice(), 2, before, after).unwrap(),
                    &reference,
                );
            }
        }
    }
}
