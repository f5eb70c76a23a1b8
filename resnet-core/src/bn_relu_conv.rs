//! `conv(ReLU(BN(x))) (+ residual)` in training as one op that saves only `x` for backward: the activated
//! tensor — the convolution's input, as large as `x` — is recomputed in backward from `x` and the batch
//! statistics (one elementwise pass) instead of being kept for the whole step.
//!
//! Every ReLU-then-conv of a residual unit goes through here (both inner pairs of an original unit, every pair
//! of a pre-activation unit, whose last one also adds the shortcut), so a unit keeps one tensor per
//! convolution where the separate ops kept two. The arithmetic is that of the separate ops — the same kernels
//! in the same order — so the results are the same bits.
//!
//! Arguments `(x, [W; γ; β])` or `(x, [W; γ; β], residual)`: candle's custom ops take at most three tensors, so
//! the parameters travel as one flat pack (its gradient is split back by `Tensor::cat`'s backward).

use crate::batch_norm::BatchNorm;
use crate::conv::Conv2d;
use crate::ops::batch_norm::{BatchNormTrain, Channels};
use crate::ops::conv::Conv2dOp;
use crate::ops::cpu_slice::contiguous_f32;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Module, Result, Shape, Tensor};

/// `conv(ReLU(BN(x)))`, plus `residual` when given (the shortcut added by a pre-activation unit's last conv).
/// `train` selects batch statistics (and updates the running ones); on the CPU in training it is one op.
pub fn bn_relu_conv(
    norm: &BatchNorm,
    conv: &Conv2d,
    x: &Tensor,
    residual: Option<&Tensor>,
    train: bool,
) -> Result<Tensor> {
    if !(train && BatchNorm::fuses(x)) {
        let y = conv.forward(&norm.forward_relu(x, train)?)?;
        return match residual {
            Some(r) => y + r,
            None => Ok(y),
        };
    }
    let x = x.contiguous()?;
    let (gamma, beta) = norm.affine();
    let weight = conv.weight();
    let op = BnReluConvOp {
        conv: Conv2dOp {
            stride: conv.stride(),
            padding: conv.padding(),
        },
        weight_shape: weight.shape().clone(),
        stats: norm.train_statistics(&x, true)?,
    };
    let pack = Tensor::cat(&[&weight.flatten_all()?, gamma, beta], 0)?;
    match residual {
        Some(r) => x.apply_op3(&pack, &r.contiguous()?, op),
        None => x.apply_op2(&pack, op),
    }
}

struct BnReluConvOp {
    conv: Conv2dOp,
    weight_shape: Shape,
    /// The batch statistics of `x`; `relu` is true.
    stats: BatchNormTrain,
}

impl BnReluConvOp {
    fn forward(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ps, pl): (&CpuStorage, &Layout),
        residual: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "bn-relu-conv input")?;
        let pack = contiguous_f32(ps, pl, "bn-relu-conv parameters")?;
        let c = Channels::of(xl.shape())?.c;
        let wn = self.weight_shape.elem_count();
        if pack.len() != wn + 2 * c {
            candle_core::bail!(
                "bn-relu-conv: {} parameters for a {:?} weight and {c} channels",
                pack.len(),
                self.weight_shape
            );
        }
        let (w, affine) = pack.split_at(wn);
        let (gamma, beta) = affine.split_at(c);
        let activated = self.stats.normalize(xl.shape(), x, gamma, beta, None)?;
        let (y, shape) = self.conv.forward_slices(
            (xl.shape(), &activated),
            (&self.weight_shape, w),
            residual,
        )?;
        Ok((CpuStorage::F32(y), shape))
    }

    /// `(dx, d[W; γ; β])` from the output gradient: the activation is recomputed, then the convolution's two
    /// gradients and BN's closed-form backward run as in the separate ops.
    fn backward(&self, x: &Tensor, pack: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let wn = self.weight_shape.elem_count();
        let c = (pack.dim(0)? - wn) / 2;
        let w = pack.narrow(0, 0, wn)?.reshape(&self.weight_shape)?;
        let gamma = pack.narrow(0, wn, c)?;
        let beta = pack.narrow(0, wn + c, c)?;
        let activated = x.apply_op3_no_bwd(&gamma, &beta, &self.stats)?;
        let dy = grad.contiguous()?;
        let (d_activated, dw) = self.conv.gradients(&activated, &dy, &w)?;
        // The activation's sign is the ReLU's mask in BN's backward.
        let (dx, dgamma_dbeta) = self.stats.gradients(x, &gamma, &activated, &d_activated)?;
        Ok((dx, Tensor::cat(&[&dw.flatten_all()?, &dgamma_dbeta], 0)?))
    }
}

impl CustomOp2 for BnReluConvOp {
    fn name(&self) -> &'static str {
        "bn-relu-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((xs, xl), (ps, pl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dpack) = self.backward(x, pack, grad)?;
        Ok((Some(dx), Some(dpack)))
    }
}

impl CustomOp3 for BnReluConvOp {
    fn name(&self) -> &'static str {
        "bn-relu-conv-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let residual = contiguous_f32(rs, rl, "bn-relu-conv residual")?;
        self.forward((xs, xl), (ps, pl), Some(residual))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _residual: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dpack) = self.backward(x, pack, grad)?;
        Ok((Some(dx), Some(dpack), Some(grad.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch_norm::batch_norm;
    use crate::conv::conv;
    use crate::ops::add_relu::add_relu;
    use crate::param_store::ParamStore;
    use candle_core::{Device, ModuleT, Var};

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// γ and β away from 1 and 0, so that every term of BN's backward shows.
    fn affine_away_from_identity(store: &ParamStore, prefix: &str, c: usize) {
        let dev = Device::Cpu;
        let gamma: Vec<f32> = (0..c).map(|i| 0.5 + 0.3 * i as f32).collect();
        let beta: Vec<f32> = (0..c).map(|i| 0.2 - 0.1 * i as f32).collect();
        let var = |name: &str| store.var(&format!("{prefix}.{name}")).unwrap();
        var("weight")
            .set(&Tensor::new(gamma, &dev).unwrap())
            .unwrap();
        var("bias").set(&Tensor::new(beta, &dev).unwrap()).unwrap();
    }

    /// Forward values and the gradients of `inputs` of `out · upstream`, summed.
    fn run(out: &Tensor, upstream: &Tensor, inputs: &[&Tensor]) -> Vec<Vec<f32>> {
        let grads = (out * upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut all = vec![values(out)];
        all.extend(
            inputs
                .iter()
                .map(|t| values(grads.get(t).expect("a gradient"))),
        );
        all
    }

    #[test]
    fn fused_bn_relu_conv_gives_the_bits_of_the_separate_ops() -> Result<()> {
        let dev = Device::Cpu;
        // (channels in, out, kernel, stride, residual): 3×3 same, 3×3 stride 2, 1×1 with the shortcut added.
        for (cin, cout, k, stride, with_residual) in [
            (8, 16, 3, 1, false),
            (8, 16, 3, 2, false),
            (16, 16, 3, 1, true),
            (16, 32, 1, 1, true),
        ] {
            let store = ParamStore::new(7);
            let vb = store.var_builder(&dev);
            let norm = batch_norm(cin, false, vb.pp("bn"))?;
            let convolution = conv(cin, cout, k, stride, false, vb.pp("conv"))?;
            affine_away_from_identity(&store, "bn", cin);
            let x = Var::randn(0.3f32, 1.5, (3, cin, 9, 9), &dev)?;
            let out_side = (9 + 2 * (k / 2) - k) / stride + 1;
            let out_shape = (3, cout, out_side, out_side);
            let residual = Var::randn(0f32, 1.0, out_shape, &dev)?;
            let upstream = Tensor::randn(0f32, 1.0, out_shape, &dev)?;
            let r = with_residual.then_some(residual.as_tensor());

            let fused = bn_relu_conv(&norm, &convolution, x.as_tensor(), r, true)?;
            let separate = convolution.forward(&norm.forward_relu(x.as_tensor(), true)?)?;
            let separate = match r {
                Some(r) => (separate + r)?,
                None => separate,
            };
            let (gamma, beta) = norm.affine();
            let mut inputs = vec![x.as_tensor(), convolution.weight(), gamma, beta];
            if with_residual {
                inputs.push(residual.as_tensor());
            }
            assert_eq!(
                run(&fused, &upstream, &inputs),
                run(&separate, &upstream, &inputs),
                "{cin}→{cout}, {k}×{k}/{stride}, residual {with_residual}"
            );
        }
        Ok(())
    }

    #[test]
    fn fused_bn_add_relu_gives_the_bits_of_the_separate_ops() -> Result<()> {
        let dev = Device::Cpu;
        let store = ParamStore::new(5);
        let norm = batch_norm(6, false, store.var_builder(&dev).pp("bn"))?;
        affine_away_from_identity(&store, "bn", 6);
        let z = Var::randn(-0.2f32, 1.3, (4, 6, 5, 7), &dev)?;
        let shortcut = Var::randn(0f32, 1.0, (4, 6, 5, 7), &dev)?;
        let upstream = Tensor::randn(0f32, 1.0, (4, 6, 5, 7), &dev)?;
        let fused = norm.forward_add_relu(z.as_tensor(), shortcut.as_tensor(), true)?;
        let separate = add_relu(&norm.forward_t(z.as_tensor(), true)?, shortcut.as_tensor())?;
        let (gamma, beta) = norm.affine();
        let inputs = [z.as_tensor(), gamma, beta, shortcut.as_tensor()];
        assert_eq!(
            run(&fused, &upstream, &inputs),
            run(&separate, &upstream, &inputs)
        );
        Ok(())
    }
}
