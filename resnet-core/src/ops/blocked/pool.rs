//! The blocked layout's max pool (the ImageNet stem's) and option-A shortcut (subsample, zero channels).

use super::layout::Blocked;
use crate::ops::cpu_slice::Scratch;
use crate::ops::max_pool::MaxPool2d;
use candle_core::Result;
use rayon::prelude::*;

/// `pool` over each plane; windows are clipped to the plane (PyTorch pads with −∞).
pub fn max_pool(x: &Blocked, pool: &MaxPool2d) -> Result<Blocked> {
    let (k, s, p, l) = (pool.kernel, pool.stride, pool.padding, x.lanes);
    if x.h + 2 * p < k || x.w + 2 * p < k || s == 0 || 2 * p > k {
        candle_core::bail!("max pool {k}×{k}/{s} (padding {p}) on a {}×{} plane", x.h, x.w);
    }
    let (oh, ow) = (pool.output_size(x.h), pool.output_size(x.w));
    let mut data = Scratch::zeroed(x.n * x.c * oh * ow);
    data.par_chunks_mut(oh * ow * l)
        .enumerate()
        .for_each(|(block, dst)| {
            let src = &x.data[block * x.h * x.w * l..][..x.h * x.w * l];
            for (o, out) in dst.chunks_exact_mut(l).enumerate() {
                let (y, xo) = ((o / ow) * s, (o % ow) * s);
                let rows = y.saturating_sub(p)..(y + k - p).min(x.h);
                let cols = xo.saturating_sub(p)..(xo + k - p).min(x.w);
                out.fill(f32::NEG_INFINITY);
                for iy in rows {
                    for ix in cols.clone() {
                        let v = &src[(iy * x.w + ix) * l..][..l];
                        out.iter_mut().zip(v).for_each(|(m, v)| *m = m.max(*v));
                    }
                }
            }
        });
    Ok(Blocked {
        data,
        n: x.n,
        c: x.c,
        h: oh,
        w: ow,
        lanes: l,
    })
}

/// `x[:, :, ::stride, ::stride]` with `before` zero channels in front and `after` behind (option A).
pub fn zero_pad_shortcut(x: &Blocked, stride: usize, before: usize, after: usize) -> Result<Blocked> {
    let (l, c) = (x.lanes, x.c + before + after);
    if !c.is_multiple_of(l) || stride == 0 {
        candle_core::bail!("option-A shortcut to {c} channels: not blocks of {l}");
    }
    let (oh, ow) = (x.h.div_ceil(stride), x.w.div_ceil(stride));
    let mut data = Scratch::zeroed(x.n * c * oh * ow);
    data.par_chunks_mut(oh * ow * l)
        .enumerate()
        .for_each(|(block, dst)| {
            let (img, cb) = (block / (c / l), block % (c / l));
            for lane in 0..l {
                let Some(ch) = (cb * l + lane).checked_sub(before).filter(|&ch| ch < x.c) else {
                    continue;
                };
                let src = &x.data[(img * x.c / l + ch / l) * x.h * x.w * l..];
                for (o, px) in dst.chunks_exact_mut(l).enumerate() {
                    let (y, xi) = ((o / ow) * stride, (o % ow) * stride);
                    px[lane] = src[(y * x.w + xi) * l + ch % l];
                }
            }
        });
    Ok(Blocked {
        data,
        n: x.n,
        c,
        h: oh,
        w: ow,
        lanes: l,
    })
}
