//! The fast CPU ops on every convolution and BatchNorm shape the registered nets use, against candle's
//! reference ops: the convolution (forward, input and weight gradients) against candle's `conv2d` and its
//! autograd, the fused BatchNorm(+ReLU) training op against BatchNorm composed from candle ops.
//!
//! Spatial sizes are capped at 14 (keeping odd sizes odd, so stride-2 edge cases stay), batch 2: the channel
//! counts, kernels, strides and paddings are the nets' own.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::conv::ConvShape;
use resnet_core::conv_op::Conv2dOp;
use resnet_core::{Family, Model, REGISTERED};
use std::collections::BTreeSet;
use tests::{max_abs, max_abs_diff};

type Shape = (usize, usize, usize, usize, usize, usize); // c_in, c_out, kernel, stride, padding, side

fn capped(side: usize) -> usize {
    if side <= 14 {
        side
    } else {
        14 - (side % 2 == 1) as usize
    }
}

/// Every distinct convolution of every registered net, with its spatial size capped.
fn all_conv_shapes() -> BTreeSet<Shape> {
    let mut shapes = BTreeSet::new();
    for &name in REGISTERED {
        let model = Model::by_name(name, 0, &Device::Cpu).unwrap();
        let side = match model.config().family {
            Family::Cifar => 32,
            Family::ImageNet => 224,
        };
        for s in model.conv_shapes((side, side)) {
            let ConvShape {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                input,
            } = s;
            shapes.insert((
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                capped(input.0),
            ));
        }
    }
    shapes
}

fn close(what: &str, ours: &Tensor, reference: &Tensor, shape: &Shape) {
    let (diff, scale) = (
        max_abs_diff(ours, reference).unwrap(),
        max_abs(reference).unwrap(),
    );
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "{what} of {shape:?}: max |diff| {diff} (max |reference| {scale})"
    );
}

#[test]
fn convolution_and_batch_norm_on_every_registered_shape() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let shapes = all_conv_shapes();
    assert!(shapes.len() > 40, "only {} shapes", shapes.len());
    let mut norm_shapes = BTreeSet::new();
    for shape @ &(c_in, c_out, k, stride, padding, side) in &shapes {
        let x = Var::randn(0f32, 1.0, (2, c_in, side, side), &dev)?;
        let w = Var::randn(0f32, 0.1, (c_out, c_in, k, k), &dev)?;
        let op = Conv2dOp { stride, padding };
        let ours = x.as_tensor().apply_op2(w.as_tensor(), op)?;
        let reference = x.as_tensor().conv2d(w.as_tensor(), padding, stride, 1, 1)?;
        close("forward", &ours, &reference, shape);
        let up = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
        let g_ours = (&ours * &up)?.sum_all()?.backward()?;
        // candle 0.11's own conv backward derives the transposed-conv output size from the height alone:
        // fine here, every input is square.
        let g_ref = (&reference * &up)?.sum_all()?.backward()?;
        for (what, v) in [("input gradient", &x), ("weight gradient", &w)] {
            close(what, g_ours.get(v).unwrap(), g_ref.get(v).unwrap(), shape);
        }
        norm_shapes.insert((c_out, ours.dim(2)?));
    }
    for &(channels, side) in &norm_shapes {
        check_batch_norm(channels, side, &dev)?;
    }
    eprintln!(
        "{} convolution shapes and {} BatchNorm shapes match candle's reference ops",
        shapes.len(),
        norm_shapes.len()
    );
    Ok(())
}

/// The fused op (with and without ReLU) against the composed reference: output and all three gradients.
fn check_batch_norm(channels: usize, side: usize, dev: &Device) -> anyhow::Result<()> {
    let shape = (channels, 0, 0, 0, 0, side);
    let varmap = VarMap::new();
    let bn = resnet_core::batch_norm::batch_norm(
        channels,
        false,
        VarBuilder::from_varmap(&varmap, DType::F32, dev),
    )?;
    let vars = varmap.data().lock().unwrap().clone();
    let (gamma, beta) = (&vars["weight"], &vars["bias"]);
    gamma.set(&Tensor::randn(1f32, 0.2, channels, dev)?)?;
    beta.set(&Tensor::randn(0f32, 0.2, channels, dev)?)?;
    let x = Var::randn(0.5f32, 2.0, (2, channels, side, side), dev)?;
    let ours = bn.forward_relu(x.as_tensor(), true)?;
    let per_channel = |t: &Tensor| t.reshape((1, channels, 1, 1));
    let xs = x.as_tensor();
    let mean = xs
        .mean_keepdim(D::Minus1)?
        .mean_keepdim(2)?
        .mean_keepdim(0)?;
    let centred = xs.broadcast_sub(&mean)?;
    let var = centred
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .mean_keepdim(2)?
        .mean_keepdim(0)?;
    let reference = centred
        .broadcast_div(&(var + resnet_core::batch_norm::EPS)?.sqrt()?)?
        .broadcast_mul(&per_channel(gamma.as_tensor())?)?
        .broadcast_add(&per_channel(beta.as_tensor())?)?
        .relu()?;
    close("batch-norm output", &ours, &reference, &shape);
    let up = Tensor::randn(0f32, 1.0, ours.shape(), dev)?;
    let g_ours = (&ours * &up)?.sum_all()?.backward()?;
    let g_ref = (&reference * &up)?.sum_all()?.backward()?;
    for (what, v) in [("input", &x), ("weight", gamma), ("bias", beta)] {
        let (a, b) = (g_ours.get(v).unwrap(), g_ref.get(v).unwrap());
        // The reference sums in f32 one value at a time: allow its rounding on the long per-channel sums.
        let (diff, scale) = (max_abs_diff(a, b)?, max_abs(b)?);
        assert!(
            diff <= 2e-4 * scale.max(1.0),
            "batch-norm {what} gradient, {channels} channels {side}×{side}: {diff} (max {scale})"
        );
    }
    Ok(())
}
