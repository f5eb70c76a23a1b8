//! The residual-unit variants of Identity Mappings beyond what the training-pass fixtures check
//! (train_step_parity): parameter counts against PyTorch builds of every variant on ResNet-110 and ResNet-164,
//! the dropout shortcut in evaluation (PyTorch's logits) and in training (its keep ratio, its masks per step),
//! the gate's initial bias and the names.

use candle_core::{DType, Device, Tensor};
use resnet_core::combine::{DropoutDraws, Join};
use resnet_core::optim::{Sgd, SgdConfig};
use resnet_core::{config_for, train_step, Block, Combine, Model, Shortcut, StepOptions, Unit};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tests::{max_abs, max_abs_diff, on_one_isa, strip_prefix};

fn fixture_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(file)
}

#[test]
fn parameter_counts_equal_pytorch_builds_of_every_variant_on_resnet110_and_resnet164(
) -> anyhow::Result<()> {
    let path = fixture_path("identity-mappings-params.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("required fixture {}: {e}", path.display()))?;
    let counts: BTreeMap<String, usize> = serde_json::from_str(&text)?;
    assert_eq!(counts.len(), 38, "{}", path.display());
    for (name, &expected) in &counts {
        let model = Model::by_name(name, 0, &Device::Cpu)?;
        assert_eq!(model.parameter_count(), expected, "{name}");
        // The summary the CLI prints adds up to the same count.
        let rows: usize = model.net.layers((32, 32)).iter().map(|l| l.params).sum();
        assert_eq!(rows, expected, "{name}: layer table");
    }
    // The papers' sizes: ResNet-110 1.7M (Deep Residual Learning Table 6), ResNet-164 1.7M (Identity Mappings).
    assert_eq!(counts["resnet110"], 1_727_962);
    assert_eq!(counts["preact_resnet164"], 1_703_258);
    Ok(())
}

#[test]
fn dropout_shortcut_in_evaluation_matches_pytorch() -> anyhow::Result<()> {
    let path = fixture_path("eval-resnet8_dropout_shortcut.safetensors");
    let f = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("required fixture {}: {e}", path.display()))?;
    let model = Model::by_name("resnet8_dropout_shortcut", 0, &Device::Cpu)?;
    model.load_tensors(&strip_prefix(&f, "init."), &path)?;
    let logits = model.forward_t(&f["x"], false)?;
    let diff = max_abs_diff(&logits, &f["logits"])?;
    assert!(
        diff <= 1e-4 * max_abs(&f["logits"])?,
        "logits differ by {diff}"
    );
    // Evaluation adds the shortcut unchanged, so the folded net is the same function.
    let folded = model.predictor(true)?;
    assert!(folded.is_folded());
    let diff = max_abs_diff(&folded.forward(&f["x"])?, &f["logits"])?;
    assert!(
        diff <= 1e-4 * max_abs(&f["logits"])?,
        "folded logits differ by {diff}"
    );
    Ok(())
}

/// dropout(h) + F for h = 1, F = 0 in training: the mask itself.
fn mask(join: &Join, shape: (usize, usize, usize, usize)) -> anyhow::Result<Vec<f32>> {
    let dev = Device::Cpu;
    let h = Tensor::ones(shape, DType::F32, &dev)?;
    let f = Tensor::zeros(shape, DType::F32, &dev)?;
    Ok(join.forward_t(&h, &h, &f, true)?.flatten_all()?.to_vec1()?)
}

#[test]
fn dropout_shortcut_keeps_half_the_values_scaled_by_two_with_one_mask_per_step(
) -> anyhow::Result<()> {
    let draws = Arc::new(DropoutDraws::default());
    let join = |unit: u64| Join::Dropout {
        rate: 0.5,
        draws: draws.clone(),
        unit,
    };
    let shape = (8, 16, 32, 32);
    let first = mask(&join(3), shape)?;
    let kept = first.iter().filter(|&&v| v != 0.0).count() as f64 / first.len() as f64;
    assert!((kept - 0.5).abs() < 0.01, "kept {kept}");
    assert!(first.iter().all(|&v| v == 0.0 || v == 2.0));
    // The same step draws the same mask (recomputation runs the forward twice); another step or another unit
    // draws another.
    assert_eq!(first, mask(&join(3), shape)?);
    let agree = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
    };
    assert!((agree(&first, &mask(&join(4), shape)?) - 0.5).abs() < 0.01);
    draws.set_step(1);
    assert!((agree(&first, &mask(&join(3), shape)?) - 0.5).abs() < 0.01);
    // Evaluation adds the shortcut unchanged.
    let dev = Device::Cpu;
    let h = Tensor::ones(shape, DType::F32, &dev)?;
    let eval = join(3).forward_t(&h, &h, &h.zeros_like()?, false)?;
    assert_eq!(eval.sum_all()?.to_scalar::<f32>()?, h.elem_count() as f32);
    Ok(())
}

#[test]
fn dropout_shortcut_training_is_reproducible_and_recomputation_draws_the_same_masks(
) -> anyhow::Result<()> {
    // Bit-for-bit comparisons: all on one kernel set.
    on_one_isa(dropout_training_is_reproducible)
}

fn dropout_training_is_reproducible() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &dev)?;
    let y = Tensor::new(&[1u32, 4, 2, 9], &dev)?;
    // Three SGD steps from seed 5: the losses, once straight and once recomputing activations in backward.
    let losses = |recompute: bool| -> anyhow::Result<Vec<u32>> {
        let model = Model::by_name("resnet8_dropout_shortcut", 5, &dev)?;
        let mut sgd = Sgd::new(model.trainable_vars(), SgdConfig::default());
        let options = StepOptions {
            label_smoothing: 0.0,
            recompute,
        };
        (0..3)
            .map(|step| {
                model.set_training_step(step);
                Ok(train_step(&model, &mut sgd, &x, &y, &options)?
                    .loss
                    .to_bits())
            })
            .collect()
    };
    let straight = losses(false)?;
    assert_eq!(straight, losses(false)?, "same seed, same losses");
    assert_eq!(straight, losses(true)?, "recomputation");
    // The masks matter: the training loss differs from that of the plain-sum twin with the same weights.
    let twin = Model::by_name("resnet8", 5, &dev)?;
    let with_dropout = Model::by_name("resnet8_dropout_shortcut", 5, &dev)?;
    let loss = |m: &Model| -> anyhow::Result<f32> {
        Ok(resnet_core::cross_entropy(&m.forward_t(&x, true)?, &y, 0.0)?.to_scalar()?)
    };
    assert_ne!(loss(&twin)?.to_bits(), loss(&with_dropout)?.to_bits());
    Ok(())
}

#[test]
fn gates_start_at_the_papers_bias_and_the_trainer_can_change_it() -> anyhow::Result<()> {
    for name in ["resnet110_exclusive_gating", "resnet110_shortcut_gating"] {
        let model = Model::by_name(name, 0, &Device::Cpu)?;
        let bias = model
            .params
            .var("layer2.3.gate.bias")
            .expect("a gate in every unit");
        let values: Vec<f32> = bias.as_tensor().to_vec1()?;
        assert_eq!(values.len(), 32, "{name}: one bias per output channel");
        assert!(values.iter().all(|&b| b == -6.0), "{name}: {values:?}");
        let mut config = config_for(name)?;
        config.combine = config.combine.with_gate_bias(0.0).expect("a gated join");
        let model = Model::new(&config, 0, &Device::Cpu)?;
        let values: Vec<f32> = model
            .params
            .var("layer1.0.gate.bias")
            .expect("gate")
            .as_tensor()
            .to_vec1()?;
        assert!(values.iter().all(|&b| b == 0.0), "{name}: {values:?}");
    }
    assert!(config_for("resnet110")?
        .combine
        .with_gate_bias(0.0)
        .is_none());
    Ok(())
}

#[test]
fn variant_names_and_how_their_depth_is_counted() -> anyhow::Result<()> {
    // 1-layer skip: 110 = 3·36 + 2 weighted layers, one 3×3 convolution per unit.
    let one_layer = config_for("resnet110_1layer")?;
    assert_eq!(
        (one_layer.block, one_layer.stage_depths.clone()),
        (Block::Single, vec![36, 36, 36])
    );
    assert_eq!(one_layer.depth(), 110);
    assert_eq!(one_layer.shortcut, Shortcut::A);
    let preact = config_for("preact_resnet110_1layer")?;
    assert_eq!(
        (preact.unit, preact.shortcut),
        (Unit::PreActivation, Shortcut::B)
    );
    // Any depth 3n+2 has a 1-layer net, whether or not a two-layer net of that depth exists.
    assert_eq!(config_for("resnet11_1layer")?.stage_depths, vec![3, 3, 3]);
    // ResNet-164 is the bottleneck net of Identity Mappings, with projections where the shape changes.
    let r164 = config_for("resnet164")?;
    assert_eq!(
        (r164.block, r164.shortcut, r164.stage_depths.clone()),
        (Block::Bottleneck, Shortcut::B, vec![18, 18, 18])
    );
    assert_eq!(config_for("resnet1202")?.block, Block::Basic);
    for (name, unit) in [
        ("resnet110_bn_after_add", Unit::BnAfterAddition),
        ("resnet164_relu_before_add", Unit::ReluBeforeAddition),
        ("resnet164_relu_preact", Unit::ReluOnlyPreActivation),
    ] {
        assert_eq!(config_for(name)?.unit, unit, "{name}");
    }
    assert_eq!(
        config_for("resnet110_scale_both")?.combine,
        Combine::ConstantScaling {
            shortcut: 0.5,
            branch: 0.5
        }
    );
    assert_eq!(config_for("resnet110_conv_shortcut")?.shortcut, Shortcut::C);
    // Placements change original units only; shortcut variants need a shortcut; ImageNet names take none.
    for bad in [
        "preact_resnet110_bn_after_add",
        "plain110_scale_both",
        "resnet50_exclusive_gating",
        "resnet110_1layer_relu_preact",
        "resnet21_1layer",
    ] {
        let err = config_for(bad).unwrap_err();
        assert!(
            matches!(err, resnet_core::ResNetError::UnknownModel { .. }),
            "{bad}: {err}"
        );
    }
    Ok(())
}
