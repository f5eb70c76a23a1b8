//! The option-A shortcut where the shape changes, `y = zero-pad channels(x[:, :, ::s, ::s])`, as one op on the
//! CPU: candle's composition (pads, reshapes, narrows, a copy and a concatenation) made ~6 full-size tensors and
//! cost 12 ms forward and backward on ResNet-20's first stride-2 unit, where the op itself moves a quarter of
//! the input.

use crate::ops::blocked::{self, BlockedSlice};
use crate::ops::cpu_slice::{contiguous_f32, written_by};
use crate::ops::parallel::for_each_chunk;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

/// Subsample by `stride` (rows and columns 0, s, 2s, …) and put `before`/`after` zero channels around.
#[derive(Debug, Clone, Copy)]
pub struct ZeroPadShortcut {
    pub stride: usize,
    pub before: usize,
    pub after: usize,
}

impl ZeroPadShortcut {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            x.contiguous()?.apply_op1(*self)
        } else {
            subsample(x, self.stride)?.pad_with_zeros(1, self.before, self.after)
        }
    }

    fn output_dims(&self, (n, c, h, w): (usize, usize, usize, usize)) -> [usize; 4] {
        let s = self.stride;
        [
            n,
            self.before + c + self.after,
            h.div_ceil(s),
            w.div_ceil(s),
        ]
    }
}

/// `x[:, :, ::s, ::s]` from candle ops, for other devices: pad odd sizes, split each spatial dim into
/// (size/s, s), keep index 0.
fn subsample(x: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let (n, c, h, w) = x.dims4()?;
    let x = x.pad_with_zeros(2, 0, (s - h % s) % s)?;
    let x = x.pad_with_zeros(3, 0, (s - w % s) % s)?;
    let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
    x.reshape((n, c, oh, s, ow, s))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, oh, ow))
}

impl CustomOp1 for ZeroPadShortcut {
    fn name(&self) -> &'static str {
        "zero-pad-shortcut"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "option-A shortcut input")?;
        if let [n, blocks, h, w, lanes] = *layout.shape().dims() {
            // Channel-blocked (training on blocked tensors, `ops::conv`): the inference kernel's.
            let x = BlockedSlice::new(x, (n, blocks * lanes, h, w), lanes)?;
            let (y, (c, h, w)) =
                blocked::zero_pad_shortcut_values(x, self.stride, self.before, self.after)?;
            return Ok((CpuStorage::F32(y), Shape::from((n, c / lanes, h, w, lanes))));
        }
        let (n, c, h, w) = layout.shape().dims4()?;
        let [_, oc, oh, ow] = self.output_dims((n, c, h, w));
        let s = self.stride;
        // One output plane per task: a padding channel is zeros, channel `before + k` samples input channel k.
        let fill = |y: &mut [MaybeUninit<f32>]| {
            for_each_chunk(y, oh * ow, |plane, out| {
                let (img, ch) = (plane / oc, plane % oc);
                let Some(k) = ch.checked_sub(self.before).filter(|&k| k < c) else {
                    out.iter_mut().for_each(|o| {
                        o.write(0.0);
                    });
                    return;
                };
                let src = &x[(img * c + k) * h * w..][..h * w];
                for (i, row) in out.chunks_mut(ow).enumerate() {
                    let src_row = &src[i * s * w..];
                    for (j, o) in row.iter_mut().enumerate() {
                        o.write(src_row[j * s]);
                    }
                }
            });
        };
        // SAFETY: the planes cover the output and every element of each is written.
        let y = unsafe { written_by(n * oc * oh * ow, fill) };
        Ok((CpuStorage::F32(y), Shape::from((n, oc, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = ZeroPadShortcutGrad {
            forward: *self,
            input: x.shape().clone(),
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The gradient: each sampled input cell gets its output cell's gradient, every other cell 0.
struct ZeroPadShortcutGrad {
    forward: ZeroPadShortcut,
    /// `[N, C, H, W]`, or `[N, C/B, H, W, B]` channel-blocked.
    input: Shape,
}

impl CustomOp1 for ZeroPadShortcutGrad {
    fn name(&self) -> &'static str {
        "zero-pad-shortcut-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = contiguous_f32(storage, layout, "option-A shortcut gradient")?;
        let (dims, lanes) = match *self.input.dims() {
            [n, blocks, h, w, lanes] => ((n, blocks * lanes, h, w), lanes),
            _ => (self.input.dims4()?, 1),
        };
        let (n, c, h, w) = dims;
        let [_, oc, oh, ow] = self.forward.output_dims(dims);
        if layout.shape().elem_count() != n * oc * oh * ow
            || layout.shape().rank() != self.input.rank()
            || !oc.is_multiple_of(lanes)
        {
            candle_core::bail!(
                "option-A shortcut gradient: expected shape {:?} (blocks of {lanes}), got {:?}",
                [n, oc, oh, ow],
                layout.shape()
            );
        }
        if lanes > 1 {
            let dx = self.blocked(dy, dims, lanes);
            return Ok((CpuStorage::F32(dx), self.input.clone()));
        }
        let (s, before) = (self.forward.stride, self.forward.before);
        let fill = |dx: &mut [MaybeUninit<f32>]| {
            for_each_chunk(dx, h * w, |plane, out| {
                let (img, k) = (plane / c, plane % c);
                let src = &dy[(img * oc + before + k) * oh * ow..][..oh * ow];
                for (i, row) in out.chunks_mut(w).enumerate() {
                    let sampled = i % s == 0;
                    for (j, o) in row.iter_mut().enumerate() {
                        let v = if sampled && j % s == 0 {
                            src[(i / s) * ow + j / s]
                        } else {
                            0.0
                        };
                        o.write(v);
                    }
                }
            });
        };
        // SAFETY: the planes cover dx and every element of each is written.
        let dx = unsafe { written_by(n * c * h * w, fill) };
        Ok((CpuStorage::F32(dx), Shape::from((n, c, h, w))))
    }
}

impl ZeroPadShortcutGrad {
    /// The gradient in blocks of `lanes`: input cell `(ch, y, x)` takes output cell `(ch + before, y/s, x/s)`
    /// where `y` and `x` are multiples of `s`, else 0.
    fn blocked(
        &self,
        dy: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        lanes: usize,
    ) -> Vec<f32> {
        let (s, before) = (self.forward.stride, self.forward.before);
        let [_, oc, oh, ow] = self.forward.output_dims((n, c, h, w));
        if before.is_multiple_of(lanes) {
            // Whole zero blocks: each pixel one copy of its block's values.
            return subsampling_adjoint(dy, (n, c, h, w), (oc, before / lanes), lanes, s);
        }
        let fill = |dx: &mut [MaybeUninit<f32>]| {
            for_each_chunk(dx, h * w * lanes, |chunk, out| {
                let (img, block) = (chunk / (c / lanes), chunk % (c / lanes));
                for (p, pixel) in out.chunks_exact_mut(lanes).enumerate() {
                    let (y, x) = (p / w, p % w);
                    let sampled = y % s == 0 && x % s == 0;
                    for (lane, d) in pixel.iter_mut().enumerate() {
                        let o = block * lanes + lane + before;
                        let at = (((img * oc + o) / lanes * oh + y / s) * ow + x / s) * lanes;
                        d.write(if sampled { dy[at + o % lanes] } else { 0.0 });
                    }
                }
            });
        };
        // SAFETY: the chunks cover dx and every element of each is written.
        unsafe { written_by(n * c * h * w, fill) }
    }
}

/// The adjoint of `x[:, :, ::s, ::s]` on blocked tensors (the input gradient of a strided 1×1 convolution,
/// `ops::conv`, and of option A where its zero channels are whole blocks): `dy` `[N, OC/B, ⌈H/s⌉, ⌈W/s⌉, B]`,
/// from its block `first`, spread to every `s`-th pixel of every `s`-th row of `[N, C/B, H, W, B]` (`dims`
/// `(N, C, H, W)`), zeros between; a pixel's `B` values are one copy.
pub(crate) fn subsampling_adjoint(
    dy: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    (oc, first): (usize, usize),
    lanes: usize,
    s: usize,
) -> Vec<f32> {
    let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
    let (blocks, out_blocks) = (c / lanes, oc / lanes);
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        for_each_chunk(dx, h * w * lanes, |chunk, out| {
            let (img, block) = (chunk / blocks, chunk % blocks);
            let src =
                &dy[(img * out_blocks + first + block) * oh * ow * lanes..][..oh * ow * lanes];
            for (y, row) in out.chunks_exact_mut(w * lanes).enumerate() {
                for (x, pixel) in row.chunks_exact_mut(lanes).enumerate() {
                    match y % s == 0 && x % s == 0 {
                        true => {
                            let from = &src[((y / s) * ow + x / s) * lanes..][..lanes];
                            pixel.iter_mut().zip(from).for_each(|(d, &v)| {
                                d.write(v);
                            });
                        }
                        false => pixel.iter_mut().for_each(|d| {
                            d.write(0.0);
                        }),
                    }
                }
            }
        });
    };
    // SAFETY: the chunks cover dx and every pixel of each is written.
    unsafe { written_by(n * c * h * w, fill) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The op and candle's composition agree exactly, forward and backward, on even and odd sizes.
    #[test]
    fn op_equals_candle_composition() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, stride, before, after) in [
            ((3, 4, 8, 8), 2, 2, 2),
            ((2, 3, 7, 5), 2, 1, 2),
            ((2, 2, 9, 9), 3, 0, 3),
            ((1, 2, 4, 4), 1, 1, 0),
        ] {
            let op = ZeroPadShortcut {
                stride,
                before,
                after,
            };
            let x = Var::randn(0f32, 1.0, shape, &dev)?;
            let fast = x.as_tensor().apply_op1(op)?;
            let composed = subsample(x.as_tensor(), stride)?.pad_with_zeros(1, before, after)?;
            assert_eq!(fast.dims(), composed.dims());
            assert_eq!(
                fast.flatten_all()?.to_vec1::<f32>()?,
                composed.flatten_all()?.to_vec1::<f32>()?
            );
            let upstream = Tensor::randn(0f32, 1.0, fast.shape(), &dev)?;
            let g_fast = (fast * &upstream)?.sum_all()?.backward()?;
            let g_composed = (composed * &upstream)?.sum_all()?.backward()?;
            let flat = |g: &candle_core::backprop::GradStore| {
                g.get(x.as_tensor())
                    .unwrap()
                    .flatten_all()?
                    .to_vec1::<f32>()
            };
            assert_eq!(
                flat(&g_fast)?,
                flat(&g_composed)?,
                "{shape:?} stride {stride}"
            );
        }
        Ok(())
    }
}
