//! Eval-mode logits of published ImageNet checkpoints (float16 files) equal PyTorch's:
//! max |ours − theirs| ≤ 1e-3 × max |theirs| (../shared/fixtures/README.md), on every CPU kernel set.

use candle_core::Device;
use resnet_core::Model;
use tests::{for_each_isa, load_fixture, max_abs, max_abs_diff, shared};

fn check(model_name: &str, fixture: &str) -> anyhow::Result<()> {
    let model = Model::by_name(model_name, 0, &Device::Cpu)?;
    model.load_weights(&shared(&format!("fixtures/{fixture}.safetensors")))?;
    let io = load_fixture(&format!("fixtures/{fixture}.io.safetensors"))?;
    let logits = model.forward_t(&io["input"], false)?;
    let expected = &io["logits"];
    let diff = max_abs_diff(&logits, expected)?;
    let tol = 1e-3 * max_abs(expected)?;
    println!("{model_name}: max abs diff {diff:.3e}, tolerance {tol:.3e}");
    assert!(diff <= tol, "{model_name}: logits differ by {diff} > {tol}");
    Ok(())
}

#[test]
fn torchvision_resnet18_logits_match_pytorch() -> anyhow::Result<()> {
    for_each_isa(|_| check("resnet18", "torchvision-resnet18"))
}

#[test]
fn torchvision_resnet50_logits_match_pytorch() -> anyhow::Result<()> {
    for_each_isa(|_| check("resnet50", "torchvision-resnet50"))
}

#[test]
fn timm_resnetv2_50_logits_match_pytorch() -> anyhow::Result<()> {
    for_each_isa(|_| check("resnetv2_50", "timm-resnetv2_50"))
}
