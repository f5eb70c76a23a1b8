//! The fast CPU ops on every convolution and BatchNorm shape the registered nets use, against candle's
//! reference ops: the convolution (forward, input and weight gradients) against candle's `conv2d` and its
//! autograd, on every CPU kernel set this machine has, at the nets' real plane sizes, batch 1 and 2 (and 8 on
//! planes of 14×14 and smaller); the
//! fused BatchNorm(+ReLU) training op against BatchNorm composed from candle ops.
//!
//! Each pass also reports the algorithm it ran (`ops::conv::last_algorithm`): the test checks that it is the
//! dispatcher's choice, and that every algorithm (direct, Winograd, im2col + GEMM, pointwise GEMM, blocked) was
//! compared in every pass on real shapes, on each kernel set that has it.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::conv::ConvShape;
use resnet_core::ops::conv::{last_algorithm, Algorithm, Conv2dOp, Pass};
use resnet_core::ops::isa::Isa;
use resnet_core::{Family, Model, REGISTERED};
use std::collections::{BTreeMap, BTreeSet};
use tests::{for_each_isa, max_abs, max_abs_diff};

type Shape = (usize, usize, usize, usize, usize, usize); // c_in, c_out, kernel, stride, padding, side

/// Every distinct convolution of every registered net, at its real input size.
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
            shapes.insert((in_channels, out_channels, kernel, stride, padding, input.0));
        }
    }
    shapes
}

/// Within float32 rounding of a sum of `terms` products: ‖ours − reference‖∞ ≤ max(1e-5, 4·ε·√terms) ×
/// max(1, ‖reference‖∞). At the nets' real sizes the weight gradient of the stem sums 2 × 112² products per
/// value, where a flat 1e-5 is within the reference's own rounding.
fn close(what: &str, ours: &Tensor, reference: &Tensor, shape: &Shape, terms: usize) {
    let (diff, scale) = (
        max_abs_diff(ours, reference).unwrap(),
        max_abs(reference).unwrap(),
    );
    let tolerance = (4.0 * f32::EPSILON * (terms as f32).sqrt()).max(1e-5);
    assert!(
        diff <= tolerance * scale.max(1.0),
        "{what} of {shape:?}: max |diff| {diff} (max |reference| {scale}, tolerance {tolerance})"
    );
}

/// candle's forward and gradients of `sum(conv(x, w) · up)`: the reference for one shape and batch.
struct Reference {
    x: Var,
    w: Var,
    up: Tensor,
    y: Tensor,
    dx: Tensor,
    dw: Tensor,
}

fn reference(shape: &Shape, batch: usize, dev: &Device) -> anyhow::Result<Reference> {
    let &(c_in, c_out, k, stride, padding, side) = shape;
    let x = Var::randn(0f32, 1.0, (batch, c_in, side, side), dev)?;
    let w = Var::randn(0f32, 0.1, (c_out, c_in, k, k), dev)?;
    let y = x.as_tensor().conv2d(w.as_tensor(), padding, stride, 1, 1)?;
    let up = Tensor::randn(0f32, 1.0, y.shape(), dev)?;
    // candle 0.11's own conv backward derives the transposed-conv output size from the height alone: fine
    // here, every input is square.
    let grads = (&y * &up)?.sum_all()?.backward()?;
    let (dx, dw) = (
        grads.get(&x).unwrap().clone(),
        grads.get(&w).unwrap().clone(),
    );
    Ok(Reference {
        x,
        w,
        up,
        y,
        dx,
        dw,
    })
}

/// Products summed into one value of `pass`.
fn terms(&(c_in, c_out, k, stride, padding, side): &Shape, batch: usize, pass: Pass) -> usize {
    let out_side = (side + 2 * padding - k) / stride + 1;
    match pass {
        Pass::Forward => c_in * k * k,
        Pass::InputGrad => (c_out * k * k).div_ceil(stride * stride),
        Pass::WeightGrad => batch * out_side * out_side,
    }
}

#[test]
fn convolution_and_batch_norm_on_every_registered_shape() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let shapes = all_conv_shapes();
    assert!(shapes.len() > 40, "only {} shapes", shapes.len());
    let mut norm_shapes = BTreeSet::new();
    // (kernel set, pass) → algorithms that ran and matched the reference.
    let mut covered: BTreeMap<(Isa, Pass), BTreeSet<Algorithm>> = BTreeMap::new();
    for shape @ &(_, c_out, _, stride, padding, _) in &shapes {
        let op = Conv2dOp { stride, padding };
        // Batch 8 on planes of 14×14 and smaller too: Winograd's F(2×2) tiles need a group of images there.
        let batches: &[usize] = if shape.5 <= 14 { &[1, 2, 8] } else { &[1, 2] };
        for &batch in batches {
            let r = reference(shape, batch, &dev)?;
            let (x, w) = (r.x.as_tensor(), r.w.as_tensor());
            for_each_isa(|isa| {
                let passes: [(Pass, &str, Tensor, &Tensor); 3] = [
                    (Pass::Forward, "forward", x.apply_op2_no_bwd(w, &op)?, &r.y),
                    (
                        Pass::InputGrad,
                        "input gradient",
                        op.input_gradient(&r.up, w, x.shape())?,
                        &r.dx,
                    ),
                    (
                        Pass::WeightGrad,
                        "weight gradient",
                        op.weight_gradient(x, &r.up, w.shape())?,
                        &r.dw,
                    ),
                ];
                // Both gradients at once, as training takes them (one conversion of the output gradient where
                // both passes run blocked kernels): the same bits as each on its own.
                let (dx, dw) = op.gradients(x, &r.up, w)?;
                for (both, (_, what, alone, _)) in [dx, dw].iter().zip(&passes[1..]) {
                    let diff = max_abs_diff(both, alone)?;
                    assert_eq!(
                        diff, 0.0,
                        "{isa} {what} of {shape:?} with both, batch {batch}"
                    );
                }
                for (pass, what, ours, expected) in passes {
                    close(
                        &format!("{isa} {what}, batch {batch}"),
                        &ours,
                        expected,
                        shape,
                        terms(shape, batch, pass),
                    );
                    let ran = last_algorithm(pass).expect("the op records its algorithm");
                    let chosen = Algorithm::choose(&op, x.shape(), w.shape(), pass, isa)?;
                    assert_eq!(ran, chosen, "{isa} {what} of {shape:?}, batch {batch}");
                    covered.entry((isa, pass)).or_default().insert(ran);
                }
                Ok(())
            })?;
            norm_shapes.insert((c_out, r.y.dim(2)?));
        }
    }
    for isa in Isa::available() {
        for pass in Pass::ALL {
            let mut expected = BTreeSet::from([
                Algorithm::Im2colGemm,
                Algorithm::PointwiseGemm,
                Algorithm::Winograd,
            ]);
            // The blocked kernels: AVX2 and AVX-512, in every pass (the forward pass, the 3×3 stride-1 input
            // gradient, the 3×3 weight gradient); so the strided 1×1 kernels of the ImageNet nets' projections
            // (forward on planes of 14×14 outputs or more, input gradient on 28×28; the others keep im2col + GEMM).
            if isa >= Isa::Avx2 {
                expected.insert(Algorithm::Blocked);
                if pass != Pass::WeightGrad {
                    expected.insert(Algorithm::StridedPointwise);
                }
            }
            assert_eq!(covered[&(isa, pass)], expected, "{isa} {pass:?}");
        }
    }
    for &(channels, side) in &norm_shapes {
        check_batch_norm(channels, side, &dev)?;
    }
    eprintln!(
        "{} convolution shapes (batch 1 and 2, and 8 on planes up to 14×14; kernel sets {:?}) and {} BatchNorm shapes match candle's reference ops",
        shapes.len(),
        Isa::available(),
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
    // The reference in float64, so that its own rounding on the long per-channel sums (2 × 112² values at the
    // stem) does not count against ours.
    let f64_var = |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::F64)?);
    let (x64, gamma64, beta64) = (f64_var(&x)?, f64_var(gamma)?, f64_var(beta)?);
    let per_channel = |t: &Tensor| t.reshape((1, channels, 1, 1));
    let xs = x64.as_tensor();
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
    let normalized = centred
        .broadcast_div(&(var + resnet_core::batch_norm::EPS)?.sqrt()?)?
        .broadcast_mul(&per_channel(gamma64.as_tensor())?)?
        .broadcast_add(&per_channel(beta64.as_tensor())?)?;
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    close(
        "batch-norm output",
        &ours,
        &f32_of(&normalized.relu()?)?,
        &shape,
        1,
    );
    // The ReLU's mask from ours: a pre-activation within rounding of 0 may round to opposite signs in f32 and
    // f64, one value in about a million (a gradient off by the whole `up` value in 1 of 3 runs at the stem's
    // 1.6 M values).
    let mask = ours.gt(0f32)?.to_dtype(DType::F64)?;
    let up = Tensor::randn(0f32, 1.0, ours.shape(), dev)?;
    let g_ours = (&ours * &up)?.sum_all()?.backward()?;
    let g_ref = (normalized.mul(&mask)? * up.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let plane_sum = 2 * side * side;
    for (what, v, v64) in [
        ("input", &x, &x64),
        ("weight", gamma, &gamma64),
        ("bias", beta, &beta64),
    ] {
        // Ours: f32 values, f64 sums; within float32 rounding of a per-channel sum of that many values.
        let terms = if what == "input" { 1 } else { plane_sum };
        let expected = f32_of(g_ref.get(v64).unwrap())?;
        close(
            &format!("batch-norm {what} gradient"),
            g_ours.get(v).unwrap(),
            &expected,
            &shape,
            terms,
        );
    }
    Ok(())
}

/// Whether the blocked forward runs a shape by Winograd's algorithm on a blocked batch of `n` (the rule of
/// `ops::winograd::blocked_applies`, written out): 3×3 stride-1 layers of at least 32 channels on planes from
/// 8×8 (F(4×4) tiles, 2×2 on an 8×8 plane), of 128 below (F(2×2), 4×4 on 7×7), whose GEMMs get 48 tiles or
/// more (a group of up to 128 tiles of n / 2 images), or one image of 16 F(4×4) tiles or more.
fn blocked_winograd(&(c_in, c_out, k, stride, _, side): &Shape, n: usize) -> bool {
    let (m, min_channels) = if side >= 8 { (4, 32) } else { (2, 128) };
    let tiles = side.div_ceil(m).pow(2);
    let per_gemm = 128usize.div_ceil(tiles).min(n / 2).max(1) * tiles;
    (k, stride) == (3, 1)
        && c_in.min(c_out) >= min_channels
        && if n == 1 {
            m == 4 && tiles >= 16
        } else {
            per_gemm >= 48
        }
}

/// The blocked-layout inference convolution (`ops::blocked`, what the folded nets run on the CPU) on every
/// registered shape, batch 1 and 2 (and 5 on CIFAR planes), every kernel set: `ReLU(conv(x) + bias + residual)` against candle's
/// `conv2d` and element-wise ops. The network's first convolution reads the NCHW image, the others a blocked input.
#[test]
fn blocked_convolution_on_every_registered_shape() -> anyhow::Result<()> {
    use resnet_core::ops::blocked::{lanes, Blocked, BlockedAlgorithm, BlockedConv, Source};
    let dev = Device::Cpu;
    let mut ran = BTreeMap::<Isa, usize>::new();
    let mut algorithms = BTreeMap::<(Isa, &str), usize>::new();
    for shape @ &(c_in, c_out, k, stride, padding, side) in &all_conv_shapes() {
        // Batch 5: more images than twice the threads, where a batch is padded image by image; batch 8 on
        // 7×7 planes and 24 on CIFAR's 8×8 and 16×16 ones, for Winograd's GEMMs (48 tiles or more).
        let batches: &[usize] = match side {
            0..=7 => &[1, 2, 5, 8],
            8..=16 => &[1, 2, 5, 24],
            17..=32 => &[1, 2, 5],
            _ => &[1, 2],
        };
        for &batch in batches {
            let x = Tensor::randn(0f32, 1.0, (batch, c_in, side, side), &dev)?;
            let w = Tensor::randn(0f32, 0.1, (c_out, c_in, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, c_out, &dev)?;
            let y = x.conv2d(&w, padding, stride, 1, 1)?;
            let residual = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
            let expected = y
                .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?
                .add(&residual)?
                .relu()?;
            let pixels = x.flatten_all()?.to_vec1::<f32>()?;
            for_each_isa(|isa| {
                let l = lanes(isa);
                assert!(BlockedConv::applies(isa, c_out), "{isa}: {shape:?}");
                let conv = BlockedConv::new(isa, &w, &bias.to_vec1()?, (stride, padding), true)?;
                let blocked_x;
                let source = if c_in % l == 0 {
                    blocked_x = Blocked::from_nchw(&x, l)?;
                    blocked_x.source()
                } else {
                    let (n, c, h, w) = x.dims4()?;
                    Source::nchw(&pixels, (n, c, h, w))
                };
                let r = Blocked::from_nchw(&residual, l)?;
                let algorithm = conv.algorithm(source);
                let winograd = c_in % l == 0 && blocked_winograd(shape, batch);
                assert_eq!(
                    algorithm == BlockedAlgorithm::Winograd,
                    winograd,
                    "{isa}: {shape:?} batch {batch}"
                );
                *algorithms
                    .entry((isa, if winograd { "winograd" } else { "direct" }))
                    .or_default() += 1;
                let ours = conv.forward(source, Some(&r))?.to_nchw()?;
                close(
                    &format!("{isa} blocked forward, batch {batch}"),
                    &ours,
                    &expected,
                    shape,
                    terms(shape, batch, Pass::Forward),
                );
                *ran.entry(isa).or_default() += 1;
                Ok(())
            })?;
        }
    }
    let cases: usize = all_conv_shapes()
        .iter()
        .map(|s| match s.5 {
            0..=16 => 4,
            17..=32 => 3,
            _ => 2,
        })
        .sum();
    for isa in Isa::available() {
        assert_eq!(ran[&isa], cases, "{isa}");
        // ResNet-50's wide 28×28, 14×14 and 7×7 layers at least, and every shape directly.
        assert!(algorithms[&(isa, "winograd")] >= 3, "{isa}: {algorithms:?}");
        assert!(
            algorithms[&(isa, "direct")] >= all_conv_shapes().len(),
            "{isa}: {algorithms:?}"
        );
    }
    Ok(())
}
