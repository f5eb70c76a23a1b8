//! The real pretrained CIFAR-10 ResNets of ../shared/weights classify the 20 original (lossless) CIFAR-10 test
//! PNGs exactly as PyTorch does: ResNet-20 20/20 correct, ResNet-32 19/20 with test-15 predicted as class 6.

use candle_core::{Device, Tensor};
use datasets::transforms::{image_tensor, Normalize};
use resnet_core::{weights::read_metadata, Model};
use tests::{for_each_isa, shared};

/// (file index, label) of the 20 PNGs, from their names `test-II-label-L.png`.
fn pngs() -> Vec<(usize, usize, std::path::PathBuf)> {
    let dir = shared("data/cifar10-test-png");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            let parts: Vec<&str> = stem.split('-').collect();
            (parts[1].parse().unwrap(), parts[3].parse().unwrap(), p)
        })
        .collect();
    files.sort();
    assert_eq!(files.len(), 20, "expected 20 PNGs in {}", dir.display());
    files
}

fn predictions(model_name: &str) -> anyhow::Result<Vec<(usize, usize, usize)>> {
    let weights = shared(&format!("weights/cifar10-{model_name}.safetensors"));
    let meta = read_metadata(&weights)?;
    let normalize = Normalize::parse(&meta["normalize_mean"], &meta["normalize_std"])?;
    assert_eq!(normalize, Normalize::IMAGENET);
    let model = Model::by_name(model_name, 0, &Device::Cpu)?;
    model.load_weights(&weights)?;
    let files = pngs();
    let batch: Vec<Tensor> = files
        .iter()
        .map(|(_, _, p)| image_tensor(p, &normalize, &Device::Cpu))
        .collect::<Result<_, _>>()?;
    let logits = model.forward_t(&Tensor::cat(&batch, 0)?, false)?;
    let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
    Ok(files
        .iter()
        .zip(predicted)
        .map(|((i, label, _), p)| (*i, *label, p as usize))
        .collect())
}

#[test]
fn pretrained_resnet20_classifies_all_20_pngs_correctly() -> anyhow::Result<()> {
    for_each_isa(|_| {
        for (i, label, predicted) in predictions("resnet20")? {
            assert_eq!(predicted, label, "test-{i:02}");
        }
        Ok(())
    })
}

#[test]
fn pretrained_resnet32_matches_pytorch_including_its_one_mistake() -> anyhow::Result<()> {
    for_each_isa(|_| {
        for (i, label, predicted) in predictions("resnet32")? {
            let expected = if i == 15 { 6 } else { label };
            assert_eq!(predicted, expected, "test-{i:02} (label {label})");
        }
        Ok(())
    })
}
