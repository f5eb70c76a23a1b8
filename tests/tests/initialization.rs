//! Initialisation (He fan-out, seeded, zero-init of the residual branch) and saving with BN statistics.

use candle_core::{Device, Tensor};
use resnet_core::{config_for, weights::read_metadata, Model};
use std::collections::HashMap;
use tests::{max_abs_diff, on_one_isa};

fn values(model: &Model, name: &str) -> Vec<f32> {
    let var = model
        .params
        .var(name)
        .unwrap_or_else(|| panic!("no {name}"));
    var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn convolutions_get_he_fan_out_normal_weights_from_the_seed() {
    let a = Model::by_name("resnet56", 11, &Device::Cpu).unwrap();
    let w = values(&a, "layer3.4.conv2.weight");
    let n = w.len() as f32;
    let mean = w.iter().sum::<f32>() / n;
    let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
    let expected = (2.0f32 / (64.0 * 9.0)).sqrt();
    assert!(mean.abs() < 0.002, "mean {mean}");
    assert!(
        (std / expected - 1.0).abs() < 0.02,
        "std {std}, He fan-out {expected}"
    );
    assert_eq!(values(&a, "layer1.0.bn1.weight"), vec![1.0; 16]);
    assert_eq!(values(&a, "layer1.0.bn1.bias"), vec![0.0; 16]);

    let same = Model::by_name("resnet56", 11, &Device::Cpu).unwrap();
    assert_eq!(
        values(&same, "layer3.4.conv2.weight"),
        w,
        "same seed, same weights"
    );
    let other = Model::by_name("resnet56", 12, &Device::Cpu).unwrap();
    assert_ne!(
        values(&other, "layer3.4.conv2.weight"),
        w,
        "another seed, other weights"
    );
}

#[test]
fn zero_init_residual_zeroes_the_last_affine_map_of_every_branch() {
    let mut config = config_for("resnet20").unwrap();
    config.zero_init_residual = true;
    let model = Model::new(&config, 0, &Device::Cpu).unwrap();
    for stage in 1..=3 {
        for i in 0..3 {
            assert_eq!(
                values(&model, &format!("layer{stage}.{i}.bn2.weight")),
                vec![0.0; 16 << (stage - 1)]
            );
            assert!(values(&model, &format!("layer{stage}.{i}.bn1.weight"))
                .iter()
                .all(|&v| v == 1.0));
        }
    }
    // Pre-activation branches end in a conv, not a BN: that conv starts at zero.
    let mut preact = config_for("resnetv2_50").unwrap();
    preact.zero_init_residual = true;
    let model = Model::new(&preact, 0, &Device::Cpu).unwrap();
    assert!(values(&model, "stages.2.blocks.3.conv3.weight")
        .iter()
        .all(|&v| v == 0.0));
    assert!(values(&model, "stages.2.blocks.3.norm3.weight")
        .iter()
        .all(|&v| v == 1.0));
}

#[test]
fn saved_weights_carry_the_running_statistics_and_metadata() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let model = Model::by_name("resnet20", 3, &dev)?;
    let x = Tensor::randn(0.5f32, 2.0, (8, 3, 32, 32), &dev)?;
    model.forward_t(&x, true)?; // updates running statistics
    assert_ne!(values(&model, "bn1.running_mean"), vec![0.0; 16]);

    let dir = std::env::temp_dir().join(format!("resnet-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("trained.safetensors");
    let meta = HashMap::from([("model".to_string(), "resnet20".to_string())]);
    model.save_weights(&path, meta)?;
    assert_eq!(read_metadata(&path)?["model"], "resnet20");
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(&dir)?.count(), 1);

    let reloaded = Model::by_name("resnet20", 99, &dev)?;
    reloaded.load_weights(&path)?;
    assert_eq!(
        values(&reloaded, "bn1.running_mean"),
        values(&model, "bn1.running_mean")
    );
    assert_eq!(
        values(&reloaded, "layer3.2.bn2.running_var"),
        values(&model, "layer3.2.bn2.running_var")
    );
    // Both forwards on one kernel set: tests that loop over the sets switch it for the whole process.
    let diff = on_one_isa(|| {
        max_abs_diff(
            &reloaded.forward_t(&x, false)?,
            &model.forward_t(&x, false)?,
        )
    })?;
    assert_eq!(diff, 0.0);
    Ok(())
}

#[test]
fn batch_norm_recalibration_averages_the_batch_statistics() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let model = Model::by_name("resnet20", 4, &dev)?;
    model.forward_t(&Tensor::randn(3f32, 1.0, (8, 3, 32, 32), &dev)?, true)?; // some moving average to replace
    let batches: Vec<Tensor> = (0..3)
        .map(|i| Tensor::randn(i as f32, 1.0 + i as f32, (6, 3, 32, 32), &dev))
        .collect::<candle_core::Result<_>>()?;
    // Expected for the stem BN: the plain average over batches of conv1's per-channel batch mean / unbiased var.
    let w = model.params.var("conv1.weight").unwrap();
    let (mut mean, mut var) = (vec![0f32; 16], vec![0f32; 16]);
    for x in &batches {
        let y = x.conv2d(w.as_tensor(), 1, 1, 1, 1)?;
        let m = y.mean_keepdim((0, 2, 3))?;
        let n = (6 * 32 * 32) as f64;
        let v = (y.broadcast_sub(&m)?.sqr()?.sum_keepdim((0, 2, 3))? / (n - 1.0))?;
        for (acc, t) in [(&mut mean, m), (&mut var, v)] {
            acc.iter_mut()
                .zip(t.flatten_all()?.to_vec1::<f32>()?)
                .for_each(|(a, b)| *a += b / 3.0);
        }
    }
    let used = model.recalibrate_batch_norm(batches.into_iter().map(Ok))?;
    assert_eq!(used, 3);
    for (got, want) in values(&model, "bn1.running_mean").iter().zip(&mean) {
        assert!((got - want).abs() < 1e-4, "mean {got} vs {want}");
    }
    for (got, want) in values(&model, "bn1.running_var").iter().zip(&var) {
        assert!(
            (got - want).abs() < 1e-3 * want.abs().max(1.0),
            "var {got} vs {want}"
        );
    }
    Ok(())
}
