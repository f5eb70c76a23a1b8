//! BatchNorm2d with PyTorch's semantics: batch statistics (biased variance) in training and a running
//! estimate updated with momentum 0.1 from the *unbiased* variance; running statistics in evaluation.

use crate::ops::add_relu::add_relu;
use crate::ops::batch_norm::{BatchNormAddRelu, BatchNormTrain, ChannelStats, Channels};
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
    let running_mean =
        Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
    let running_var =
        Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
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

    /// BN followed by ReLU; in training on the CPU both run as one op.
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.forward_train(x, true)
        } else {
            self.forward_eval(x)?.relu()
        }
    }

    /// The affine map's `(γ, β)`.
    pub(crate) fn affine(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// Whether a training-mode pass on `x` runs the fused CPU ops (`ops::batch_norm`, `bn_relu_conv`).
    pub(crate) fn fuses(x: &Tensor) -> bool {
        x.device().is_cpu() && x.dtype() == DType::F32
    }

    /// `ReLU(BN(x) + shortcut)`, the end of an original residual unit. In training on the CPU one op that
    /// saves only `x` and its output (the BN output is not kept for backward).
    pub fn forward_add_relu(&self, x: &Tensor, shortcut: &Tensor, train: bool) -> Result<Tensor> {
        if !(train && Self::fuses(x)) || shortcut.shape() != x.shape() {
            return add_relu(&self.forward_t(x, train)?, shortcut);
        }
        let x = x.contiguous()?;
        let op = BatchNormAddRelu {
            stats: self.train_statistics(&x, true)?,
        };
        x.apply_op3(
            &Tensor::cat(&[&self.weight, &self.bias], 0)?,
            &shortcut.contiguous()?,
            op,
        )
    }

    /// The batch statistics of a contiguous f32 CPU tensor `x` (one f64-accumulated pass), as the parameters of
    /// the fused training op, with the running averages updated.
    pub(crate) fn train_statistics(&self, x: &Tensor, relu: bool) -> Result<BatchNormTrain> {
        let count = Self::train_count(x)?;
        let stats = x.apply_op1_no_bwd(&ChannelStats)?;
        let (mean, var) = (stats.get(0)?, stats.get(1)?);
        let op = BatchNormTrain {
            mean: mean.to_vec1()?,
            inv_std: var
                .to_vec1::<f32>()?
                .iter()
                .map(|v| 1.0 / (v + EPS as f32).sqrt())
                .collect(),
            relu,
        };
        self.update_running(&mean, &var, count)?;
        Ok(op)
    }

    /// Values per channel in a training-mode pass over `x`; BN needs at least two.
    fn train_count(x: &Tensor) -> Result<f64> {
        // NCHW, or channel-blocked in training on the CPU (`ops::conv`).
        let count = Channels::of(x.shape())?.count() as f64;
        if count < 2.0 {
            candle_core::bail!(
                "BatchNorm in training needs more than one value per channel, got input {:?}",
                x.shape()
            );
        }
        Ok(count)
    }

    /// PyTorch's running averages: momentum 0.1, the variance unbiased.
    fn update_running(&self, mean: &Tensor, var: &Tensor, count: f64) -> Result<()> {
        let unbiased = (var * (count / (count - 1.0)))?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - MOMENTUM))? + (mean * MOMENTUM)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - MOMENTUM))? + (unbiased * MOMENTUM)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)
    }

    fn forward_train(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        if Self::fuses(x) {
            return self.forward_train_fused(&x.contiguous()?, relu);
        }
        let count = Self::train_count(x)?;
        let (y, mean, var) = self.forward_train_composed(x)?;
        self.update_running(&mean, &var, count)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// CPU: one statistics pass and one output pass, closed-form backward (see `ops::batch_norm`).
    fn forward_train_fused(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let op = self.train_statistics(x, relu)?;
        x.apply_op3(&self.weight, &self.bias, op)
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
        // Channel-blocked tensors come in training on the CPU (see `ops::channel_blocks`).
        let channels = match x.rank() {
            4 => x.dim(1)?,
            5 if train && Self::fuses(x) => Channels::of(x.shape())?.c,
            _ => 0,
        };
        if channels != self.channels() {
            candle_core::bail!(
                "BatchNorm over {} channels got input {:?} (expected [N, {}, H, W])",
                self.channels(),
                x.shape(),
                self.channels()
            );
        }
        if train {
            self.forward_train(x, false)
        } else {
            self.forward_eval(x)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::param_store::ParamStore;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn fused_training_op_equals_candles_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let store = ParamStore::new(3);
        let bn = batch_norm(5, false, store.var_builder(&dev))?;
        // γ and β away from 1 and 0, so that every term of the backward shows.
        store
            .var("weight")
            .unwrap()
            .set(&Tensor::new(&[0.5f32, 1.5, -0.7, 2.0, 1.1], &dev)?)?;
        store
            .var("bias")
            .unwrap()
            .set(&Tensor::new(&[0.1f32, -0.3, 0.0, 0.4, 2.0], &dev)?)?;
        let x = Var::randn(1f32, 2.0, (4, 5, 6, 7), &dev)?;
        let upstream = Tensor::randn(0f32, 1.0, (4, 5, 6, 7), &dev)?;

        let fused = bn.forward_train_fused(x.as_tensor(), false)?;
        let stats = x.as_tensor().apply_op1_no_bwd(&ChannelStats)?;
        let (fm, fv) = (stats.get(0)?, stats.get(1)?);
        let (composed, cm, cv) = bn.forward_train_composed(x.as_tensor())?;
        assert!(max_diff(&fused, &composed) < 1e-5);
        assert!(max_diff(&fm, &cm) < 1e-5 && max_diff(&fv, &cv) < 1e-5);

        let gf = (fused * &upstream)?.sum_all()?.backward()?;
        let gc = (composed * &upstream)?.sum_all()?.backward()?;
        for t in [x.as_tensor(), &bn.weight, &bn.bias] {
            let (a, b) = (gf.get(t).unwrap(), gc.get(t).unwrap());
            assert!(
                max_diff(a, b) < 1e-4,
                "gradient differs by {}",
                max_diff(a, b)
            );
        }
        Ok(())
    }

    /// The sums run over fixed groups of images (of 3 here), whatever the threads: a batch of 40 images (14
    /// groups) gives the same bits on one thread as on all of them, statistics, output and every gradient, and
    /// the statistics and gradients are candle's composed ops' (the other test's groups are single images).
    #[test]
    fn fused_training_op_is_the_same_on_any_thread_count() -> Result<()> {
        let dev = Device::Cpu;
        let store = ParamStore::new(3);
        let bn = batch_norm(5, false, store.var_builder(&dev))?;
        let x = Var::randn(1f32, 2.0, (40, 5, 6, 7), &dev)?;
        let upstream = Tensor::randn(0f32, 1.0, (40, 5, 6, 7), &dev)?;
        let run = || -> Result<Vec<Vec<f32>>> {
            let stats = x.as_tensor().apply_op1_no_bwd(&ChannelStats)?;
            let y = bn.forward_train_fused(x.as_tensor(), true)?;
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let mut all = vec![stats.flatten_all()?.to_vec1()?, y.flatten_all()?.to_vec1()?];
            for t in [x.as_tensor(), &bn.weight, &bn.bias] {
                all.push(grads.get(t).expect("a gradient").flatten_all()?.to_vec1()?);
            }
            Ok(all)
        };
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a thread pool");
        let all = run()?;
        assert_eq!(one_thread.install(run)?, all);
        let (_, mean, var) = bn.forward_train_composed(x.as_tensor())?;
        let stats = [
            mean.flatten_all()?.to_vec1::<f32>()?,
            var.flatten_all()?.to_vec1()?,
        ]
        .concat();
        let worst = stats
            .iter()
            .zip(&all[0])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst < 1e-5,
            "statistics differ from the composed ops' by {worst}"
        );
        // The fused op ran with its ReLU.
        let composed = bn.forward_train_composed(x.as_tensor())?.0.relu()?;
        let grads = (composed * &upstream)?.sum_all()?.backward()?;
        for (t, ours) in [x.as_tensor(), &bn.weight, &bn.bias]
            .into_iter()
            .zip(&all[2..])
        {
            let want: Vec<f32> = grads.get(t).expect("a gradient").flatten_all()?.to_vec1()?;
            let worst = want
                .iter()
                .zip(ours)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst < 1e-4,
                "gradient differs from the composed ops' by {worst}"
            );
        }
        Ok(())
    }

    #[test]
    fn running_statistics_follow_pytorch() -> Result<()> {
        // One channel, values 1..=4 (N=4, 1×1): mean 2.5, biased var 1.25, unbiased 5/3.
        let dev = Device::Cpu;
        let bn = batch_norm(1, false, ParamStore::new(0).var_builder(&dev))?;
        let x = Tensor::new(&[1f32, 2., 3., 4.], &dev)?.reshape((4, 1, 1, 1))?;
        let y = bn.forward_t(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
        let s = (1.25f32 + 1e-5).sqrt();
        for (got, v) in y.iter().zip([1f32, 2., 3., 4.]) {
            assert!((got - (v - 2.5) / s).abs() < 1e-6);
        }
        let rm = bn.running_mean.as_tensor().to_vec1::<f32>()?[0];
        let rv = bn.running_var.as_tensor().to_vec1::<f32>()?[0];
        assert!((rm - 0.25).abs() < 1e-7, "running mean {rm}");
        assert!(
            (rv - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6,
            "running var {rv}"
        );
        // Evaluation uses the running statistics.
        let e = bn.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        assert!((e[0] - (1.0 - rm) / (rv + 1e-5).sqrt()).abs() < 1e-6);
        Ok(())
    }
}
