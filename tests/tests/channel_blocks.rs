//! Training on channel-blocked tensors `[N, C/B, H, W, B]` (`ops::channel_blocks`): which registered nets take
//! it, each op on blocked tensors against NCHW (the convolution and each of its gradients alone against
//! candle's `conv2d` and autograd; BN and option A against the NCHW ops, which `op_shapes` checks against
//! candle's), and a whole training step the same bits on one thread and on two. (`train_parity` checks the
//! step against PyTorch on every kernel set.)

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::ops::blocked::lanes;
use resnet_core::ops::channel_blocks::{from_blocked, to_blocked};
use resnet_core::ops::conv::{last_algorithm, Algorithm, Conv2dOp, Pass};
use resnet_core::ops::isa::Isa;
use resnet_core::shortcut::ShortcutPath;
use resnet_core::{Combine, Family, Model, Unit, REGISTERED};
use tests::{for_each_isa, max_abs, max_abs_diff, on_one_isa};

/// Within `tolerance` of the reference's largest value (at least 1).
fn close(what: &str, ours: &Tensor, reference: &Tensor, tolerance: f32) {
    let (diff, scale) = (
        max_abs_diff(ours, reference).unwrap(),
        max_abs(reference).unwrap(),
    );
    assert!(
        diff <= tolerance * scale.max(1.0),
        "{what}: max |diff| {diff} (max |reference| {scale})"
    );
}

/// With AVX2 and AVX-512 every registered net of original units joined by a plain sum trains on blocked tensors:
/// the CIFAR nets (option A), and the ImageNet nets with their max-pool and projection shortcuts, basic and
/// bottleneck units; no other net, and no net in evaluation.
#[test]
fn the_first_papers_nets_train_blocked() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let models: Vec<(&str, Model)> = REGISTERED
        .iter()
        .map(|&name| Ok((name, Model::by_name(name, 0, &dev)?)))
        .collect::<anyhow::Result<_>>()?;
    let mut blocked = 0;
    for_each_isa(|isa| {
        for (name, model) in &models {
            let c = model.config();
            let side = match c.family {
                Family::Cifar => 32,
                Family::ImageNet => 224,
            };
            let x = Tensor::zeros((2, 3, side, side), DType::F32, &dev)?;
            let expected =
                isa != Isa::Generic && c.unit == Unit::Original && c.combine == Combine::Sum;
            assert_eq!(
                model.net.trains_blocked(&x, true),
                expected.then(|| lanes(isa)),
                "{isa}: {name}"
            );
            assert_eq!(
                model.net.trains_blocked(&x, false),
                None,
                "{name} in evaluation"
            );
            blocked += usize::from(expected);
        }
        Ok(())
    })?;
    assert!(blocked >= 12, "{blocked} nets trained blocked");
    Ok(())
}

/// `f` on `x` as NCHW and as blocks of `l` (converted back after), and the gradients of `sum(f(x) · up)` of
/// `x` and `params`: the blocked ones within `tolerance` of the NCHW ones.
fn blocked_equals_nchw(
    what: &str,
    x: &Var,
    params: &[&Var],
    l: usize,
    tolerance: f32,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> anyhow::Result<()> {
    let nchw = f(x.as_tensor())?;
    let blocked = from_blocked(&f(&to_blocked(x.as_tensor(), l)?)?)?;
    close(
        &format!("{what} (blocks of {l})"),
        &blocked,
        &nchw,
        tolerance,
    );
    // No upstream gradient where one output is 0 and the other is not: a ReLU input within rounding of 0,
    // whose sign the two computations' different summation orders may flip, so that one passes the gradient
    // and the other does not (~1 run in 30 failed so). Every other element, masked or not, is compared.
    let zero = |y: &Tensor| y.eq(0f32);
    let agree = zero(&nchw)?.eq(&zero(&blocked)?)?.to_dtype(nchw.dtype())?;
    let up = (Tensor::randn(0f32, 1.0, nchw.shape(), x.device())? * agree)?;
    let grads = |y: &Tensor| -> candle_core::Result<GradStore> { (y * &up)?.sum_all()?.backward() };
    let (g_nchw, g_blocked) = (grads(&nchw)?, grads(&blocked)?);
    for (i, v) in std::iter::once(x).chain(params.iter().copied()).enumerate() {
        let (a, b) = (g_blocked.get(v), g_nchw.get(v));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("{what}: no gradient for argument {i}");
        };
        close(
            &format!("{what} gradient {i} (blocks of {l})"),
            a,
            b,
            tolerance,
        );
    }
    Ok(())
}

/// `f(isa, lanes)` for each kernel set of this CPU that has blocks (AVX2, AVX-512).
fn for_each_blocked_isa(mut f: impl FnMut(Isa, usize) -> anyhow::Result<()>) -> anyhow::Result<()> {
    for_each_isa(|isa| match isa {
        Isa::Generic => Ok(()),
        _ => f(isa, lanes(isa)),
    })
}

#[test]
fn convolution_batch_norm_and_shortcut_on_blocked_tensors_equal_nchw() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let mut checked = 0;
    for_each_blocked_isa(|isa, l| {
        // The CIFAR nets' convolutions: both strides, every width, odd batches, and the algorithm the blocked
        // kernel picks for the forward and the stride-1 input gradient.
        let (direct, winograd) = (Algorithm::Blocked, Algorithm::Winograd);
        for (n, c_in, c_out, stride, side, expected) in [
            (3, 16, 16, 1, 32, direct),
            (2, 16, 32, 2, 32, direct),
            (5, 32, 32, 1, 16, direct),
            (3, 32, 64, 2, 16, direct),
            (2, 64, 64, 1, 8, direct),
            // Batches whose GEMMs get 48 tiles or more: Winograd's F(4×4) on CIFAR's planes.
            (24, 32, 32, 1, 16, winograd),
            (24, 64, 64, 1, 8, winograd),
            // Wide enough for Winograd's algorithm with two images (49 tiles per image).
            (2, 64, 64, 1, 28, winograd),
        ] {
            let x = Var::randn(0f32, 1.0, (n, c_in, side, side), &dev)?;
            let w =
                Var::from_tensor(&(Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)? * 0.1)?)?;
            let op = Conv2dOp { stride, padding: 1 };
            blocked_equals_nchw(
                &format!("{isa} conv {c_in}→{c_out}/{stride} on {side}×{side}"),
                &x,
                &[&w],
                l,
                1e-4,
                // Candle's own convolution and autograd as the NCHW reference, not our NCHW path.
                |x| match x.rank() {
                    5 => x.apply_op2(w.as_tensor(), op),
                    _ => x.conv2d(w.as_tensor(), 1, stride, 1, 1),
                },
            )?;
            // Which algorithm ran, as `bench --convs` reports it: the blocked kernel's own choice (only our op
            // records one; candle's conv2d, the reference above, does not).
            let what = format!("{isa} {c_in}→{c_out}/{stride} on {side}×{side}, alone:");
            assert_eq!(last_algorithm(Pass::Forward), Some(expected), "{what}");
            // Each gradient alone on blocked tensors (as `bench --convs` times them) against candle's autograd.
            let up = Tensor::randn(0f32, 1.0, (n, c_out, side / stride, side / stride), &dev)?;
            let grads = (x.conv2d(w.as_tensor(), 1, stride, 1, 1)? * &up)?
                .sum_all()?
                .backward()?;
            let (xb, dyb) = (to_blocked(x.as_tensor(), l)?, to_blocked(&up, l)?);
            let dx = from_blocked(&op.input_gradient(&dyb, w.as_tensor(), xb.shape())?)?;
            let input_grad = match stride {
                1 => expected,
                _ => Algorithm::Blocked,
            };
            assert_eq!(last_algorithm(Pass::InputGrad), Some(input_grad), "{what}");
            close(&format!("{what} dx"), &dx, grads.get(&x).unwrap(), 1e-4);
            let dw = op.weight_gradient(&xb, &dyb, w.shape())?;
            close(&format!("{what} dw"), &dw, grads.get(&w).unwrap(), 1e-4);
            // BN(+ReLU), and BN + shortcut + ReLU, γ and β away from 1 and 0.
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let norm = resnet_core::batch_norm::batch_norm(c_in, false, vb.pp("bn"))?;
            for (name, var) in varmap.data().lock().unwrap().iter() {
                if name.ends_with("weight") || name.ends_with("bias") {
                    var.set(&(Tensor::randn(0f32, 1.0, c_in, &dev)? + 0.5)?)?;
                }
            }
            let affine: Vec<Var> = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.ends_with("weight") || k.ends_with("bias"))
                .map(|(_, v)| v.clone())
                .collect();
            let affine: Vec<&Var> = affine.iter().collect();
            let what = format!("{isa} BN-ReLU over {c_in} channels");
            blocked_equals_nchw(&what, &x, &affine, l, 1e-4, |x| norm.forward_relu(x, true))?;
            let shortcut = Var::randn(0f32, 1.0, x.shape(), &dev)?;
            let what = format!("{isa} BN + shortcut + ReLU over {c_in} channels");
            blocked_equals_nchw(&what, &x, &affine, l, 1e-4, |x| {
                let s = match x.rank() {
                    5 => to_blocked(shortcut.as_tensor(), l)?,
                    _ => shortcut.as_tensor().clone(),
                };
                norm.forward_add_relu(x, &s, true)
            })?;
            // The option-A shortcut where the stage changes.
            if stride == 2 {
                let pad = ShortcutPath::ZeroPad {
                    stride,
                    before: (c_out - c_in) / 2,
                    after: (c_out - c_in) / 2,
                };
                let what = format!("{isa} option A {c_in}→{c_out}");
                blocked_equals_nchw(&what, &x, &[], l, 0.0, |x| pad.forward_t(x, x, true))?;
            }
            checked += 1;
        }
        Ok(())
    })?;
    assert!(checked >= 5, "no kernel set with blocks ran");
    Ok(())
}

/// The ImageNet nets' parts on blocked tensors: projection shortcuts (1×1 convolutions of stride 2 and 1, odd
/// and even planes), the stem's max-pool (ties from a ReLU's zeros: the same winners, bit for bit), and a
/// weight gradient by Winograd's algorithm reading the blocks in place; each against candle's ops and autograd,
/// and the algorithm each pass ran.
#[test]
fn projection_max_pool_and_winograd_weight_gradient_on_blocked_tensors() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let mut checked = 0;
    for_each_blocked_isa(|isa, l| {
        for (n, c_in, c_out, kernel, stride, side) in [
            (3, 64, 128, 1, 2, 14),
            (2, 32, 64, 1, 2, 7),
            (2, 32, 64, 1, 1, 8),
            (2, 64, 64, 3, 1, 28),
        ] {
            let padding = kernel / 2;
            let x = Var::randn(0f32, 1.0, (n, c_in, side, side), &dev)?;
            let w = Var::from_tensor(
                &(Tensor::randn(0f32, 1.0, (c_out, c_in, kernel, kernel), &dev)? * 0.1)?,
            )?;
            let op = Conv2dOp { stride, padding };
            let what = format!("{isa} {kernel}×{kernel} {c_in}→{c_out}/{stride} on {side}×{side}");
            blocked_equals_nchw(&what, &x, &[&w], l, 1e-4, |x| match x.rank() {
                5 => x.apply_op2(w.as_tensor(), op),
                _ => x.conv2d(w.as_tensor(), padding, stride, 1, 1),
            })?;
            let out = (side - 1) / stride + 1;
            let up = Tensor::randn(0f32, 1.0, (n, c_out, out, out), &dev)?;
            let grads = (x.conv2d(w.as_tensor(), padding, stride, 1, 1)? * &up)?
                .sum_all()?
                .backward()?;
            let (xb, dyb) = (to_blocked(x.as_tensor(), l)?, to_blocked(&up, l)?);
            let dx = from_blocked(&op.input_gradient(&dyb, w.as_tensor(), xb.shape())?)?;
            close(&format!("{what} dx"), &dx, grads.get(&x).unwrap(), 1e-4);
            let dw = op.weight_gradient(&xb, &dyb, w.shape())?;
            close(&format!("{what} dw"), &dw, grads.get(&w).unwrap(), 1e-4);
            let expected = match kernel {
                1 => [Algorithm::Blocked, Algorithm::Blocked],
                _ => [Algorithm::Winograd, Algorithm::Winograd],
            };
            assert_eq!(
                [
                    last_algorithm(Pass::InputGrad).unwrap(),
                    last_algorithm(Pass::WeightGrad).unwrap()
                ],
                expected,
                "{what}"
            );
            checked += 1;
        }
        for (n, c, side) in [(2, 64, 16), (3, 32, 15)] {
            let x = Var::randn(0f32, 1.0, (n, c, side, side), &dev)?;
            let pool = resnet_core::ops::max_pool::MaxPool2d::STEM;
            let what = format!("{isa} max-pool of {c} channels on {side}×{side}");
            blocked_equals_nchw(&what, &x, &[], l, 0.0, |x| pool.forward(&x.relu()?))?;
            checked += 1;
        }
        Ok(())
    })?;
    assert!(checked >= 6, "no kernel set with blocks ran");
    Ok(())
}

/// Loss and every gradient of one ResNet-20 training step on `images`.
fn step(model: &Model, images: &Tensor, labels: &Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
    let logits = model.forward_t(images, true)?;
    let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
    let grads = loss.backward()?;
    let mut out = vec![vec![loss.to_scalar::<f32>()?]];
    for (_, var) in model.trainable_vars() {
        let g = grads.get(&var).expect("a gradient for every parameter");
        out.push(g.flatten_all()?.to_vec1()?);
    }
    Ok(out)
}

#[test]
fn a_blocked_training_step_is_the_same_on_any_thread_count() -> anyhow::Result<()> {
    on_one_isa(|| {
        let dev = Device::Cpu;
        let model = Model::by_name("resnet20", 0, &dev)?;
        // Batch 3 runs the convolutions image by image on one thread and as whole batches on two; batch 8
        // image by image on both; batch 32 the 32- and 64-channel layers by Winograd's algorithm (groups of
        // images in parallel on two threads, one after the other on one).
        for n in [3, 8, 32] {
            let images = Tensor::randn(0f32, 1.0, (n, 3, 32, 32), &dev)?;
            let labels = Tensor::new((0..n as u32).map(|i| i % 10).collect::<Vec<_>>(), &dev)?;
            if Isa::best_available() != Isa::Generic {
                assert!(model.net.trains_blocked(&images, true).is_some());
            }
            let two = step(&model, &images, &labels)?;
            let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
            let one = one_thread.install(|| step(&model, &images, &labels))?;
            assert!(one == two, "batch {n}: one thread and two differ");
        }
        Ok(())
    })
}
