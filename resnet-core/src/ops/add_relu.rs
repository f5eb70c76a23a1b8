//! `ReLU(a + b)`, the end of every original residual unit, as one pass with one output (CPU), where candle
//! would make two full-size tensors and two backward passes.

use crate::ops::cpu_slice::{contiguous_f32, written_by};
use crate::ops::parallel::for_each_chunk;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::F32 && a.shape() == b.shape() {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}

struct AddRelu;

/// `f(a[i], b[i])` for every element of two equally long contiguous f32 tensors, in parallel chunks.
fn zip_map(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    what: &str,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<Vec<f32>> {
    let (a, b) = (contiguous_f32(s1, l1, what)?, contiguous_f32(s2, l2, what)?);
    let fill = |out: &mut [MaybeUninit<f32>]| {
        for_each_chunk(out, CHUNK, |i, o| {
            let (a, b) = (&a[i * CHUNK..][..o.len()], &b[i * CHUNK..][..o.len()]);
            o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| {
                o.write(f(a, b));
            });
        });
    };
    // SAFETY: the chunks cover the output and every element is written.
    Ok(unsafe { written_by(a.len(), fill) })
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = zip_map(s1, l1, s2, l2, "add-relu", |a, b| (a + b).max(0.0))?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = relu_mask(&grad.contiguous()?, out)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// `g·[out > 0]`: the gradient through a ReLU from its output (CPU).
pub(crate) fn relu_mask(g: &Tensor, out: &Tensor) -> Result<Tensor> {
    g.apply_op2_no_bwd(out, &ReluMask)
}

struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = zip_map(
            s1,
            l1,
            s2,
            l2,
            "relu-mask",
            |g, y| if y > 0.0 { g } else { 0.0 },
        )?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_add_then_relu_with_gradients() -> Result<()> {
        let a = Var::randn(0f32, 1.0, (2, 3, 5, 7), &Device::Cpu)?;
        let b = Var::randn(0f32, 1.0, (2, 3, 5, 7), &Device::Cpu)?;
        let up = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &Device::Cpu)?;
        let fused = add_relu(a.as_tensor(), b.as_tensor())?;
        let reference = (a.as_tensor() + b.as_tensor())?.relu()?;
        assert_eq!(
            fused.flatten_all()?.to_vec1::<f32>()?,
            reference.flatten_all()?.to_vec1::<f32>()?
        );
        let gf = (fused * &up)?.sum_all()?.backward()?;
        let gr = (reference * &up)?.sum_all()?.backward()?;
        for v in [&a, &b] {
            let (x, y) = (gf.get(v).unwrap(), gr.get(v).unwrap());
            assert_eq!(
                x.flatten_all()?.to_vec1::<f32>()?,
                y.flatten_all()?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }
}
