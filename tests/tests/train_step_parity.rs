//! Training-mode forward/backward of pre-activation CIFAR nets (basic and bottleneck units) and of an
//! ImageNet-family net against PyTorch (tests/fixtures/make_train_steps.py), once as usual and once with
//! activations recomputed per segment; the two of ours must give the same bits.
//! Tolerances of the training fixture in ../shared/fixtures/README.md: logits and loss ≤ 1e-4 relative,
//! gradients ‖a−b‖ ≤ 1e-3‖b‖ per tensor (or twice PyTorch's own float32 error against the fixture's float64
//! result, where that is larger), BN running statistics ≤ 1e-5 absolute.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use resnet_core::ops::blocked::lanes;
use resnet_core::ops::isa::Isa;
use resnet_core::{cross_entropy, recompute, Model};
use std::collections::HashMap;
use std::path::PathBuf;
use tests::{for_each_isa, max_abs, max_abs_diff, norm, shared, strip_prefix};

/// Small nets of every unit variant of Identity Mappings (tests/fixtures/make_identity_mappings.py): Fig. 4's
/// placements on basic and bottleneck units, Fig. 2's joins and shortcuts, Table 1's 1-layer skip.
const IDENTITY_MAPPINGS_VARIANTS: [&str; 15] = [
    "resnet8_bn_after_add",
    "resnet8_relu_before_add",
    "resnet8_relu_preact",
    "resnet11",
    "resnet11_bn_after_add",
    "resnet11_relu_before_add",
    "resnet29_relu_preact",
    "resnet8_scale_shortcut",
    "resnet8_scale_both",
    "resnet8_exclusive_gating",
    "resnet8_shortcut_gating",
    "resnet8_conv_shortcut",
    "preact_resnet8_exclusive_gating",
    "resnet8_1layer",
    "preact_resnet8_1layer",
];

fn fixture(name: &str) -> anyhow::Result<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("fixtures/train-step-{name}.safetensors"));
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    tensors
        .into_iter()
        .map(|(k, v)| {
            let v = match v.dtype() {
                DType::F16 | DType::BF16 => v.to_dtype(DType::F32)?,
                _ => v,
            };
            Ok((k, v))
        })
        .collect()
}

/// The fixture's net with its initial weights.
fn model(name: &str, f: &HashMap<String, Tensor>) -> anyhow::Result<Model> {
    let model = Model::by_name(name, 0, &Device::Cpu)?;
    let init = strip_prefix(f, "init.");
    if init.is_empty() {
        model.load_weights(&shared(&format!("fixtures/torchvision-{name}.safetensors")))?;
    } else {
        model.load_tensors(&init, "fixture init.*".as_ref())?;
    }
    Ok(model)
}

/// Logits, loss, every parameter's gradient and every BN running statistic after one training forward.
struct Pass {
    logits: Vec<f32>,
    loss: f32,
    grads: Vec<(String, Tensor)>,
    stats: Vec<(String, Tensor)>,
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn pass(model: &Model, f: &HashMap<String, Tensor>, recomputed: bool) -> anyhow::Result<Pass> {
    let y = f["y"].to_dtype(DType::U32)?;
    let (logits, loss, grads): (Tensor, Tensor, GradStore) = if recomputed {
        let forward = recompute::forward(model, &f["x"])?;
        let logits = forward.logits.clone();
        let loss = cross_entropy(&logits, &y, 0.0)?;
        let grads = forward.backward(&loss)?;
        (logits, loss, grads)
    } else {
        let logits = model.forward_t(&f["x"], true)?;
        let loss = cross_entropy(&logits, &y, 0.0)?;
        let grads = loss.backward()?;
        (logits, loss, grads)
    };
    let grads = model
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| {
            let g = grads.get(&var).cloned();
            (
                name.clone(),
                g.unwrap_or_else(|| panic!("no gradient for {name}")),
            )
        })
        .collect();
    let stats = model
        .params
        .named_vars()
        .into_iter()
        .filter(|(name, _)| name.contains("running"))
        .map(|(name, var)| (name, var.as_tensor().copy().unwrap()))
        .collect();
    Ok(Pass {
        logits: values(&logits),
        loss: loss.to_scalar()?,
        grads,
        stats,
    })
}

fn check_against_pytorch(
    name: &str,
    ours: &Pass,
    f: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    let logits = Tensor::new(ours.logits.as_slice(), &Device::Cpu)?.reshape(f["logits"].shape())?;
    let diff = max_abs_diff(&logits, &f["logits"])?;
    assert!(
        diff <= 1e-4 * max_abs(&f["logits"])?,
        "{name}: logits differ by {diff}"
    );
    let expected = values(&f["loss"])[0];
    assert!(
        (ours.loss - expected).abs() <= 1e-4 * expected.abs(),
        "{name}: loss {} vs PyTorch {expected}",
        ours.loss
    );
    let expected_grads = strip_prefix(f, "grad.");
    assert_eq!(
        ours.grads.len(),
        expected_grads.len(),
        "{name}: one gradient per parameter"
    );
    // The fixture's gradients are float64 results; a float32 pass can be held to the fixture tolerance or to
    // twice PyTorch's own float32 error on the net, whichever is larger (the bottleneck net: 3.6e-3).
    let tolerance = (2.0 * values(&f["f32_noise"])[0]).max(1e-3);
    let mut largest = 0f32;
    for g in expected_grads.values() {
        largest = largest.max(norm(g)?);
    }
    for (param, g) in &ours.grads {
        let expected = &expected_grads[param];
        // A gradient that is zero in exact arithmetic (a BN bias whose shift a later BN removes, as in
        // Identity Mappings' BN-after-addition units) is held to the scale of the largest gradient instead.
        let scale = norm(expected)?.max(1e-4 * largest);
        let rel = norm(&(g - expected)?)? / scale;
        assert!(
            rel <= tolerance,
            "{name}: gradient of {param} differs by {rel} (relative norm; tolerance {tolerance})"
        );
    }
    let expected_stats = strip_prefix(f, "stats.");
    assert_eq!(
        ours.stats.len(),
        expected_stats.len(),
        "{name}: every running statistic"
    );
    for (stat, v) in &ours.stats {
        let diff = max_abs_diff(v, &expected_stats[stat])?;
        assert!(diff <= 1e-5, "{name}: {stat} differs by {diff}");
    }
    Ok(())
}

fn same_bits(name: &str, a: &Pass, b: &Pass) {
    assert_eq!(a.logits, b.logits, "{name}: logits");
    assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{name}: loss");
    for ((param, x), (_, y)) in a.grads.iter().zip(&b.grads) {
        assert_eq!(values(x), values(y), "{name}: gradient of {param}");
    }
    for ((stat, x), (_, y)) in a.stats.iter().zip(&b.stats) {
        assert_eq!(values(x), values(y), "{name}: {stat}");
    }
}

#[test]
fn training_pass_matches_pytorch_with_and_without_recomputation() -> anyhow::Result<()> {
    for name in ["preact_resnet20", "preact_resnet29", "resnet18"]
        .into_iter()
        .chain(IDENTITY_MAPPINGS_VARIANTS)
    {
        let f = fixture(name)?;
        for_each_isa(|isa| {
            if name == "resnet18" {
                // The ImageNet net trains on channel-blocked tensors with AVX2 and AVX-512: max-pool and
                // projection shortcuts included.
                let blocked = model(name, &f)?.net.trains_blocked(&f["x"], true);
                assert_eq!(blocked, (isa != Isa::Generic).then(|| lanes(isa)), "{isa}");
            }
            let plain = pass(&model(name, &f)?, &f, false)?;
            check_against_pytorch(name, &plain, &f)?;
            let recomputed = pass(&model(name, &f)?, &f, true)?;
            same_bits(name, &plain, &recomputed);
            Ok(())
        })?;
    }
    Ok(())
}
