//! Max-pooling with padding and a backward pass, which candle lacks for the ImageNet stem (3×3, stride 2,
//! padding 1: candle's max-pool has no padding and no backward unless kernel == stride).
//!
//! Padding counts as −∞ and ties go to the first maximum in row-major window order, as PyTorch does, so
//! gradients equal PyTorch's even on the many zeros a ReLU leaves.

use candle_core::backend::BackendStorage;
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
        let (_, _, h, w) = x.dims4()?;
        if h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            candle_core::bail!("max-pool {self:?} needs an input of at least {0}×{0}, got {h}×{w}", self.kernel - 2 * self.padding);
        }
        if x.device().is_cpu() {
            x.contiguous()?.apply_op1(*self)
        } else {
            // Other devices: forward through candle's pool on an input padded with −∞ (no backward yet).
            let p = self.padding;
            let x = pad_with(x, 2, p, f32::NEG_INFINITY)?;
            let x = pad_with(&x, 3, p, f32::NEG_INFINITY)?;
            x.max_pool2d_with_stride(self.kernel, self.stride)
        }
    }

    /// Visits each output cell with the flat input index of its maximum (first one on ties).
    fn for_each_argmax(&self, src: &[f32], dims: (usize, usize, usize, usize), mut f: impl FnMut(usize, usize)) {
        let (n, c, h, w) = dims;
        let (oh, ow) = (self.output_size(h), self.output_size(w));
        for plane in 0..n * c {
            let base = plane * h * w;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best = f32::NEG_INFINITY;
                    let mut best_idx = usize::MAX;
                    for ky in 0..self.kernel {
                        let y = (oy * self.stride + ky) as isize - self.padding as isize;
                        if y < 0 || y >= h as isize {
                            continue;
                        }
                        for kx in 0..self.kernel {
                            let x = (ox * self.stride + kx) as isize - self.padding as isize;
                            if x < 0 || x >= w as isize {
                                continue;
                            }
                            let idx = base + y as usize * w + x as usize;
                            let v = src[idx];
                            // Strict `>`: the first maximum wins ties; NaN propagates, as in PyTorch.
                            if v > best || v.is_nan() || best_idx == usize::MAX {
                                best = v;
                                best_idx = idx;
                            }
                        }
                    }
                    f((plane * oh + oy) * ow + ox, best_idx);
                }
            }
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

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        other => candle_core::bail!("max-pool {what}: only f32 is supported on CPU, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("max-pool {what}: input must be contiguous"),
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d-padded"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(storage, layout, "forward")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let (oh, ow) = (self.output_size(h), self.output_size(w));
        let mut out = vec![0f32; n * c * oh * ow];
        self.for_each_argmax(src, (n, c, h, w), |o, i| out[o] = src[i]);
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
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

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(s1, l1, "backward input")?;
        let grad_out = f32_slice(s2, l2, "backward gradient")?;
        let dims = l1.shape().dims4()?;
        let mut grad_in = vec![0f32; src.len()];
        self.0.for_each_argmax(src, dims, |o, i| grad_in[i] += grad_out[o]);
        Ok((CpuStorage::F32(grad_in), l1.shape().clone()))
    }
}
