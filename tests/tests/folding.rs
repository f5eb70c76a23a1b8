//! BatchNorm folded into the convolutions for inference: the same logits as the unfolded network within 1e-4
//! relative, for every registered net with original units joined by a sum (or a dropout shortcut, a sum in
//! evaluation), and PyTorch's logits on the real fixtures.

use candle_core::{Device, Tensor};
use resnet_core::{Combine, Family, Model, Unit, REGISTERED};
use tests::{for_each_isa, load_fixture, max_abs, max_abs_diff, on_one_isa, shared};

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b).unwrap() / max_abs(b).unwrap()
}

/// A CIFAR batch larger than one pass through the blocked net (16 images of 32×32 at ResNet-20's widths), on
/// every kernel set: each image's logits within 1e-4 of the unfolded net's (candle's ops, which the PyTorch
/// fixtures check), so the passes take the right images and put their logits back in order; and within 1e-5 of
/// what the image gets alone in the folded net (the head's matrix product has another row count). The passes
/// run side by side on the threads: the logits are the same bits on one thread.
#[test]
fn a_batch_in_several_passes_gives_each_image_its_own_logits() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let model = Model::by_name("resnet20", 5, &dev)?;
    model.forward_t(&Tensor::randn(0.3f32, 1.7, (4, 3, 32, 32), &dev)?, true)?;
    let predictor = model.predictor(true)?;
    let x = Tensor::randn(0f32, 1.0, (37, 3, 32, 32), &dev)?;
    let unfolded = model.forward_t(&x, false)?;
    for_each_isa(|_| {
        let batch = predictor.forward(&x)?;
        assert_eq!(batch.dims(), &[37, 10]);
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
        let on_one = one_thread.install(|| predictor.forward(&x))?;
        assert_eq!(
            max_abs_diff(&batch, &on_one)?,
            0.0,
            "one thread against two"
        );
        for i in 0..37 {
            let rel = rel_diff(&batch.narrow(0, i, 1)?, &unfolded.narrow(0, i, 1)?);
            assert!(rel <= 1e-4, "image {i} against the unfolded net: {rel}");
        }
        for i in [0, 15, 16, 36] {
            let alone = predictor.forward(&x.narrow(0, i, 1)?)?;
            let rel = rel_diff(&batch.narrow(0, i, 1)?, &alone);
            assert!(rel <= 1e-5, "image {i} against itself alone: {rel}");
        }
        Ok(())
    })
}

#[test]
fn folded_equals_unfolded_for_every_registered_net() -> anyhow::Result<()> {
    on_one_isa(folded_equals_unfolded)
}

fn folded_equals_unfolded() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for &name in REGISTERED {
        let model = Model::by_name(name, 5, &dev)?;
        let side = if model.config().family == Family::Cifar {
            32
        } else {
            64
        };
        // Realistic running statistics: a few training-mode forwards on shifted, scaled data.
        for _ in 0..3 {
            model.forward_t(&Tensor::randn(0.3f32, 1.7, (4, 3, side, side), &dev)?, true)?;
        }
        let x = Tensor::randn(0f32, 1.0, (2, 3, side, side), &dev)?;
        let predictor = model.predictor(true)?;
        let folds = model.config().unit == Unit::Original
            && matches!(
                model.config().combine,
                Combine::Sum | Combine::DropoutShortcut { .. }
            );
        assert_eq!(predictor.is_folded(), folds, "{name}");
        let rel = rel_diff(&predictor.forward(&x)?, &model.forward_t(&x, false)?);
        assert!(
            rel <= 1e-4,
            "{name}: folded logits differ by {rel} (relative)"
        );
    }
    Ok(())
}

#[test]
fn folded_published_checkpoints_match_pytorch() -> anyhow::Result<()> {
    for (name, fixture) in [
        ("resnet18", "torchvision-resnet18"),
        ("resnet50", "torchvision-resnet50"),
    ] {
        let model = Model::by_name(name, 0, &Device::Cpu)?;
        model.load_weights(&shared(&format!("fixtures/{fixture}.safetensors")))?;
        let io = load_fixture(&format!("fixtures/{fixture}.io.safetensors"))?;
        for_each_isa(|isa| {
            let folded = model.predictor(true)?.forward(&io["input"])?;
            assert!(
                rel_diff(&folded, &io["logits"]) <= 1e-3,
                "{name} vs PyTorch ({isa})"
            );
            assert!(
                rel_diff(&folded, &model.forward_t(&io["input"], false)?) <= 1e-4,
                "{name} folded vs unfolded ({isa})"
            );
            Ok(())
        })?;
    }
    Ok(())
}
