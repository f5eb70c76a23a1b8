//! SGD with momentum against torch.optim.SGD: the arithmetic alone (≤ 1e-6) and 3 training steps of
//! CIFAR ResNet-20 (losses ≤ 1e-4 abs, final parameters ‖a−b‖ ≤ 1e-2‖b‖ as ../shared/fixtures/README.md,
//! plus 3e-4 absolute for the float32-chaotic, near-zero BN biases: see below; running statistics
//! ≤ 1e-3‖b‖).

use candle_core::{backprop::GradStore, DType, Device, Var};
use resnet_core::optim::{Sgd, SgdConfig};
use resnet_core::Model;
use tests::{for_each_isa, load_fixture, max_abs_diff, norm, rel_norm_diff, strip_prefix};

#[test]
fn sgd_arithmetic_matches_pytorch() -> anyhow::Result<()> {
    let f = load_fixture("fixtures/sgd-steps.safetensors")?;
    for (nesterov, expected) in [(false, "momentum.p3"), (true, "nesterov.p3")] {
        let p = Var::from_tensor(&f["p0"])?;
        let config = SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.1,
            nesterov,
            decay_norm_and_bias: true,
        };
        let mut sgd = Sgd::new(vec![("p".into(), p.clone())], config);
        for step in 0..3 {
            // A gradient store holding exactly the fixture's gradient: d(Σ p·g)/dp = g.
            let g = f["grads"].get(step)?;
            let grads: GradStore = (p.as_tensor() * &g)?.sum_all()?.backward()?;
            sgd.step(&grads)?;
        }
        let diff = max_abs_diff(p.as_tensor(), &f[expected])?;
        assert!(diff <= 1e-6, "{expected}: {diff}");
    }
    Ok(())
}

#[test]
fn three_resnet20_training_steps_match_pytorch() -> anyhow::Result<()> {
    let f = load_fixture("fixtures/cifar-resnet20-train.safetensors")?;
    let y = f["y"].to_dtype(DType::U32)?;
    for_each_isa(|isa| {
        for (nesterov, tag) in [(false, "momentum"), (true, "nesterov")] {
            let model = Model::by_name("resnet20", 0, &Device::Cpu)?;
            model.load_tensors(&strip_prefix(&f, "init."), "fixture init.*".as_ref())?;
            let config = SgdConfig {
                lr: 0.02,
                momentum: 0.9,
                weight_decay: 5e-4,
                nesterov,
                decay_norm_and_bias: true,
            };
            let mut sgd = Sgd::new(model.trainable_vars(), config);
            let expected_losses = f[&format!("{tag}.loss")].to_vec1::<f32>()?;
            for (step, expected) in expected_losses.iter().enumerate() {
                let loss = candle_nn::loss::cross_entropy(&model.forward_t(&f["x"], true)?, &y)?;
                let value = loss.to_scalar::<f32>()?;
                assert!(
                    (value - expected).abs() <= 1e-4,
                    "{tag} step {step}: loss {value} vs {expected}"
                );
                sgd.step(&loss.backward()?)?;
            }
            let finals = strip_prefix(&f, &format!("{tag}.final."));
            for (name, expected) in &finals {
                let ours = model
                    .params
                    .var(name)
                    .unwrap_or_else(|| panic!("no {name}"));
                if name.contains("running") {
                    // Running statistics after 3 forwards, the last two through the updated weights: the
                    // fixture's 1e-2‖b‖ for final tensors, tightened tenfold. (An absolute 1e-4 was exceeded by a
                    // running mean of norm 1.33 with the AVX-512 blocked kernels, 1.2e-4 off, 9e-5 relative.)
                    let rel = rel_norm_diff(ours.as_tensor(), expected)?;
                    assert!(rel <= 1e-3, "{isa} {tag} {name}: ‖a−b‖/‖b‖ = {rel}");
                } else {
                    let rel = rel_norm_diff(ours.as_tensor(), expected)?;
                    // ‖a−b‖ ≤ 1e-2‖b‖ + 3e-4. The absolute 3e-4 matters only for the BN biases, which start at 0,
                    // stay near 3e-3 over 3 steps and are chaotic in float32: perturbing conv1.weight alone by 1e-7
                    // (relative) moves layer1.0.bn1.bias by 3.6e-2 relative, 1e-4 absolute (measured with this
                    // model), and the fixture's README has float64 PyTorch 1e-3 away. With the AVX-512 blocked
                    // kernels the stem's bn1.bias ended 1.6e-4 off, while every step-0 gradient of every kernel set
                    // was within 3.4e-6‖b‖ of PyTorch's (`train_parity`): the trajectory, not the arithmetic. Every
                    // weight tensor has ‖b‖ ≥ 0.1, where the bound is the fixture's 1e-2.
                    let diff = norm(&(ours.as_tensor() - expected)?)?;
                    let tol = 1e-2 * norm(expected)? + 3e-4;
                    assert!(
                        diff <= tol,
                        "{isa} {tag} {name}: ‖a−b‖ = {diff} > {tol} (relative {rel})"
                    );
                }
            }
        }
        Ok(())
    })
}

#[test]
fn momentum_buffers_round_trip_through_state() -> anyhow::Result<()> {
    let p = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
    let mut sgd = Sgd::new(vec![("w".into(), p.clone())], SgdConfig::default());
    sgd.step(&(p.as_tensor() * 2.0)?.sum_all()?.backward()?)?;
    let state = sgd.state();
    assert_eq!(
        state["momentum.w"].to_vec1::<f32>()?,
        vec![2.0001, 2.0002, 2.0003]
    );
    let mut restored = Sgd::new(vec![("w".into(), p.clone())], SgdConfig::default());
    restored.load_state(&state)?;
    assert_eq!(
        restored.state()["momentum.w"].to_vec1::<f32>()?,
        state["momentum.w"].to_vec1::<f32>()?
    );
    Ok(())
}
