//! Train-mode parity with PyTorch on `cifar-resnet20-train.safetensors` (CIFAR ResNet-20, option A):
//! logits and loss ≤ 1e-4 relative, every gradient ‖a−b‖ ≤ 1e-3‖b‖, BN running stats after one forward ≤ 1e-5.

use candle_core::{DType, Device, Tensor};
use resnet_core::ops::blocked::{lanes, Blocked, BlockedAlgorithm, BlockedConv};
use resnet_core::ops::isa::Isa;
use resnet_core::Model;
use tests::{for_each_isa, load_fixture, max_abs, max_abs_diff, rel_norm_diff, strip_prefix};

/// With AVX2 and AVX-512 the step runs on channel-blocked tensors (`ops::channel_blocks`), with the portable
/// kernels on NCHW ones: both against PyTorch.
#[test]
fn resnet20_train_step_matches_pytorch() -> anyhow::Result<()> {
    for_each_isa(train_step_matches)
}

fn train_step_matches(isa: Isa) -> anyhow::Result<()> {
    let f = load_fixture("fixtures/cifar-resnet20-train.safetensors")?;
    let model = Model::by_name("resnet20", 0, &Device::Cpu)?;
    model.load_tensors(&strip_prefix(&f, "init."), "fixture init.*".as_ref())?;
    assert_eq!(
        model.net.trains_blocked(&f["x"], true),
        (isa != Isa::Generic).then(|| lanes(isa)),
        "{isa}"
    );
    if isa != Isa::Generic {
        // At the fixture's batch (32) the 32→32 layers on 16×16 and the 64→64 ones on 8×8 run Winograd's
        // algorithm on the blocked layout (forward and input gradient), the others the direct blocked kernel:
        // this fixture holds both against PyTorch.
        let batch = f["x"].dim(0)?;
        for (layer, side, expected) in [
            ("layer1.0.conv2", 32, BlockedAlgorithm::Direct),
            ("layer2.0.conv2", 16, BlockedAlgorithm::Winograd),
            ("layer3.0.conv2", 8, BlockedAlgorithm::Winograd),
        ] {
            let w = &f[&format!("init.{layer}.weight")];
            let c = w.dim(0)?;
            let conv = BlockedConv::new(isa, w, &vec![0.0; c], (1, 1), false)?;
            let x = Blocked::from_nchw(
                &Tensor::zeros((batch, c, side, side), DType::F32, &Device::Cpu)?,
                lanes(isa),
            )?;
            assert_eq!(conv.algorithm(x.source()), expected, "{isa} {layer}");
        }
    }

    let logits = model.forward_t(&f["x"], true)?;
    let y = f["y"].to_dtype(DType::U32)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &y)?;

    let logits_diff = max_abs_diff(&logits, &f["logits0"])?;
    assert!(
        logits_diff <= 1e-4 * max_abs(&f["logits0"])?,
        "logits differ by {logits_diff}"
    );
    let expected_loss = f["loss0"].flatten_all()?.to_vec1::<f32>()?[0];
    let loss_value = loss.to_scalar::<f32>()?;
    assert!(
        (loss_value - expected_loss).abs() <= 1e-4 * expected_loss.abs(),
        "loss {loss_value} vs PyTorch {expected_loss}"
    );

    // Running statistics after that one forward (momentum 0.1, unbiased variance).
    let stats = strip_prefix(&f, "stats0.");
    assert_eq!(
        stats.len(),
        38,
        "fixture should hold mean and var of 19 BNs"
    );
    for (name, expected) in &stats {
        let ours = model
            .params
            .var(name)
            .unwrap_or_else(|| panic!("model has no {name}"));
        let diff = max_abs_diff(ours.as_tensor(), expected)?;
        assert!(diff <= 1e-5, "{name}: running stat differs by {diff}");
    }

    // Every gradient.
    let grads = loss.backward()?;
    let expected_grads = strip_prefix(&f, "grad0.");
    let trainable = model.trainable_vars();
    assert_eq!(
        trainable.len(),
        expected_grads.len(),
        "one gradient per parameter"
    );
    let mut worst = (String::new(), 0f32);
    for (name, var) in &trainable {
        let ours = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let rel = rel_norm_diff(ours, &expected_grads[name])?;
        assert!(rel <= 1e-3, "{name}: gradient differs, ‖a−b‖/‖b‖ = {rel}");
        if rel > worst.1 {
            worst = (name.clone(), rel);
        }
    }
    println!("loss {loss_value} (PyTorch {expected_loss}); logits diff {logits_diff:.2e}; worst gradient {} {:.2e}", worst.0, worst.1);
    Ok(())
}
