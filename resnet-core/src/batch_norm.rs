//! BatchNorm2d with PyTorch's semantics: batch statistics (biased variance) in training and a running
//! estimate updated with momentum 0.1 from the *unbiased* variance; running statistics in evaluation.

use crate::batch_norm_op::{BatchNormTrain, ChannelStats};
use candle_core::{DType, ModuleT, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

pub const EPS: f64 = 1e-5;
pub const MOMENTUM: f64 = 0.1;

#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
}

/// Builds `weight, bias, running_mean, running_var` under `vb`; `zero_gamma` starts γ at 0 (zero-init residual).
pub fn batch_norm(channels: usize, zero_gamma: bool, vb: VarBuilder) -> Result<BatchNorm> {
    let gamma = if zero_gamma { 0.0 } else { 1.0 };
    let weight = vb.get_with_hints(channels, "weight", Init::Const(gamma))?;
    let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
    // The store hands back the variable's own storage, so `Var::from_tensor` aliases it (no copy):
    // updating it here updates what is saved.
    let running_mean = Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
    let running_var = Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
    Ok(BatchNorm {
        weight,
        bias,
        running_mean,
        running_var,
    })
}

fn per_channel(t: &Tensor) -> Result<Tensor> {
    t.reshape((1, (), 1, 1))
}

impl BatchNorm {
    pub fn channels(&self) -> usize {
        self.weight.dims1().unwrap_or(0)
    }

    /// Per-channel `(scale, shift)` with `y = x·scale + shift` in evaluation; used to fold BN into a conv.
    pub fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let scale = (&self.weight / (self.running_var.as_tensor() + EPS)?.sqrt()?)?;
        let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
        Ok((scale, shift))
    }

    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _c, h, w) = x.dims4()?;
        let count = (n * h * w) as f64;
        if count < 2.0 {
            candle_core::bail!(
                "BatchNorm in training needs more than one value per channel, got input {:?}",
                x.shape()
            );
        }
        let (y, mean, var) = if x.device().is_cpu() && x.dtype() == DType::F32 {
            self.forward_train_fused(&x.contiguous()?)?
        } else {
            self.forward_train_composed(x)?
        };
        let unbiased = (var * (count / (count - 1.0)))?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - MOMENTUM))? + (mean * MOMENTUM)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - MOMENTUM))? + (unbiased * MOMENTUM)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        Ok(y)
    }

    /// CPU: one statistics pass and one output pass, closed-form backward (see `batch_norm_op`).
    fn forward_train_fused(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let stats = x.apply_op1_no_bwd(&ChannelStats)?;
        let (mean, var) = (stats.get(0)?, stats.get(1)?);
        let op = BatchNormTrain {
            mean: mean.to_vec1()?,
            inv_std: var.to_vec1::<f32>()?.iter().map(|v| 1.0 / (v + EPS as f32).sqrt()).collect(),
        };
        let y = x.apply_op3(&self.weight, &self.bias, op)?;
        Ok((y, mean, var))
    }

    /// Other devices: the same arithmetic from candle ops, differentiated by candle's autograd.
    fn forward_train_composed(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let mean = x.mean_keepdim((0, 2, 3))?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
        let x_hat = centered.broadcast_div(&(&var + EPS)?.sqrt()?)?;
        let y = x_hat
            .broadcast_mul(&per_channel(&self.weight)?)?
            .broadcast_add(&per_channel(&self.bias)?)?;
        Ok((y, mean.detach().flatten_all()?, var.detach().flatten_all()?))
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let (scale, shift) = self.eval_affine()?;
        x.broadcast_mul(&per_channel(&scale)?)?
            .broadcast_add(&per_channel(&shift)?)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.dim(1)? != self.channels() || x.rank() != 4 {
            candle_core::bail!(
                "BatchNorm over {} channels got input {:?} (expected [N, {}, H, W])",
                self.channels(),
                x.shape(),
                self.channels()
            );
        }
        if train {
            self.forward_train(x)
        } else {
            self.forward_eval(x)
        }
    }
}
