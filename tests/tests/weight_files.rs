//! Loading weights: float16/bfloat16/float32 files into a float32 model, and typed errors (never panics) for
//! files that are truncated, not safetensors, of the wrong shapes, or missing or carrying extra tensors.

use candle_core::{DType, Device, Tensor};
use resnet_core::{Model, ResNetError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tests::{max_abs_diff, shared};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("resnet-weight-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn resnet20() -> Model {
    Model::by_name("resnet20", 7, &Device::Cpu).unwrap()
}

fn pretrained() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(shared("weights/cifar10-resnet20.safetensors"), &Device::Cpu)
        .unwrap()
}

fn save(tensors: &HashMap<String, Tensor>, name: &str) -> PathBuf {
    let path = tmp(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

fn load_err(path: &Path) -> ResNetError {
    let model = resnet20();
    let before = model
        .params
        .var("conv1.weight")
        .unwrap()
        .as_tensor()
        .copy()
        .unwrap();
    let err = model.load_weights(path).expect_err("loading should fail");
    // Nothing is written when a file is rejected.
    let after = model.params.var("conv1.weight").unwrap();
    assert_eq!(max_abs_diff(&before, after.as_tensor()).unwrap(), 0.0);
    err
}

#[test]
fn half_precision_files_load_into_a_float32_model() -> anyhow::Result<()> {
    let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &Device::Cpu)?;
    let reference = resnet20();
    reference.load_weights(&shared("weights/cifar10-resnet20.safetensors"))?;
    let expected = reference.forward_t(&x, false)?;
    for dtype in [DType::F16, DType::BF16, DType::F64] {
        let converted: HashMap<String, Tensor> = pretrained()
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
            .collect();
        let path = save(&converted, &format!("resnet20-{dtype:?}.safetensors"));
        let model = resnet20();
        model.load_weights(&path)?;
        let var = model.params.var("conv1.weight").unwrap();
        assert_eq!(var.dtype(), DType::F32);
        let diff = max_abs_diff(&model.forward_t(&x, false)?, &expected)?;
        let tol = if dtype == DType::F64 { 1e-5 } else { 0.3 };
        assert!(diff < tol, "{dtype:?}: logits differ by {diff}");
    }
    Ok(())
}

#[test]
fn truncated_and_foreign_files_are_typed_errors() {
    let bytes = std::fs::read(shared("weights/cifar10-resnet20.safetensors")).unwrap();
    let truncated = tmp("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&truncated);
    assert!(matches!(err, ResNetError::NotSafetensors { .. }), "{err}");
    assert!(err.to_string().contains("truncated.safetensors"), "{err}");

    let text = tmp("notes.txt");
    std::fs::write(&text, "these are not weights").unwrap();
    assert!(matches!(
        load_err(&text),
        ResNetError::NotSafetensors { .. }
    ));

    let empty = tmp("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        load_err(&empty),
        ResNetError::NotSafetensors { .. }
    ));

    let missing_file = tmp("does-not-exist.safetensors");
    let err = load_err(&missing_file);
    assert!(matches!(err, ResNetError::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("does-not-exist.safetensors"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let mut tensors = pretrained();
    tensors.insert(
        "layer2.0.conv1.weight".into(),
        Tensor::zeros((32, 16, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load_err(&save(&tensors, "wrong-shape.safetensors"));
    match &err {
        ResNetError::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "layer2.0.conv1.weight");
            assert_eq!(expected, &vec![32, 16, 3, 3]);
            assert_eq!(found, &vec![32, 16, 1, 1]);
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("layer2.0.conv1.weight")
            && msg.contains("[32, 16, 3, 3]")
            && msg.contains("[32, 16, 1, 1]"),
        "{msg}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_listed() {
    let mut tensors = pretrained();
    tensors.remove("linear.bias");
    tensors.remove("layer3.2.bn2.running_var");
    let err = load_err(&save(&tensors, "missing.safetensors"));
    match &err {
        ResNetError::MissingTensors { missing, .. } => {
            assert_eq!(
                missing,
                &vec![
                    "layer3.2.bn2.running_var".to_string(),
                    "linear.bias".to_string()
                ]
            )
        }
        other => panic!("expected missing tensors, got {other}"),
    }

    let mut tensors = pretrained();
    tensors.insert(
        "fc.weight".into(),
        Tensor::zeros((10, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    // PyTorch's BN counter is not an error.
    tensors.insert(
        "bn1.num_batches_tracked".into(),
        Tensor::new(&[5i64], &Device::Cpu).unwrap(),
    );
    let err = load_err(&save(&tensors, "extra.safetensors"));
    match &err {
        ResNetError::UnexpectedTensors { unexpected, .. } => {
            assert_eq!(unexpected, &vec!["fc.weight".to_string()])
        }
        other => panic!("expected unexpected tensors, got {other}"),
    }

    // A torchvision ResNet-18 file is not a CIFAR ResNet-20.
    let err = load_err(&shared("fixtures/torchvision-resnet18.safetensors"));
    assert!(matches!(err, ResNetError::MissingTensors { .. }), "{err}");
}

#[test]
fn integer_tensors_are_rejected_by_name() {
    let mut tensors = pretrained();
    tensors.insert(
        "bn1.weight".into(),
        Tensor::new(&[1i64; 16], &Device::Cpu).unwrap(),
    );
    match load_err(&save(&tensors, "int.safetensors")) {
        ResNetError::UnsupportedDtype { name, .. } => assert_eq!(name, "bn1.weight"),
        other => panic!("expected an unsupported dtype, got {other}"),
    }
}
