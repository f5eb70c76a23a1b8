//! Weights from the Hugging Face hub, served by a loopback mock hub that the test starts: torchvision names,
//! the same weights renamed to transformers names, timm resnetv2; the architecture from `config.json`; the
//! cache on a second call with the server down; offline mode; an unreachable hub.
//!
//! One test function: the hub client reads its endpoint and cache from the environment of the process.

use candle_core::Device;
use resnet_core::transformers_names::transformers_name;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use tests::mock_hub::MockHub;
use tests::{load_fixture, max_abs, max_abs_diff, shared, temp_dir};

fn check_logits(weights: &str, model: Option<&str>, fixture: &str) -> resnet_infer::LoadedModel {
    let loaded = resnet_infer::load_model(model, weights, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{weights}: {e:#}"));
    let io = load_fixture(&format!("fixtures/{fixture}.io.safetensors")).unwrap();
    let logits = loaded.model.forward_t(&io["input"], false).unwrap();
    let diff = max_abs_diff(&logits, &io["logits"]).unwrap();
    let tol = 1e-3 * max_abs(&io["logits"]).unwrap();
    assert!(diff <= tol, "{weights}: logits differ by {diff} > {tol}");
    loaded
}

#[test]
fn weights_from_a_mock_hub() {
    let dir = temp_dir("hub");
    // The torchvision file renamed to transformers names, as microsoft/resnet-50 publishes it.
    let tv = candle_core::safetensors::load(
        shared("fixtures/torchvision-resnet50.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let renamed: HashMap<String, candle_core::Tensor> = tv
        .into_iter()
        .map(|(k, v)| {
            (
                transformers_name(&k).unwrap_or_else(|| panic!("no name for {k}")),
                v,
            )
        })
        .collect();
    let hf_file = dir.join("transformers-resnet50.safetensors");
    candle_core::safetensors::save(&renamed, &hf_file).unwrap();
    let json = |name: &str, value: serde_json::Value| {
        let p = dir.join(name);
        std::fs::write(&p, value.to_string()).unwrap();
        p
    };
    let hf_config = json(
        "hf-config.json",
        serde_json::json!({"model_type": "resnet", "depths": [3, 4, 6, 3], "layer_type": "bottleneck",
            "id2label": (0..1000).map(|i| (i.to_string(), serde_json::Value::from(format!("c{i}")))).collect::<serde_json::Map<String, serde_json::Value>>()}),
    );
    let timm_config = json(
        "timm-config.json",
        serde_json::json!({"architecture": "resnetv2_50", "num_classes": 1000,
            "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}),
    );
    let files: HashMap<String, PathBuf> = HashMap::from([
        (
            "timm/resnet50.tv_in1k/model.safetensors".into(),
            shared("fixtures/torchvision-resnet50.safetensors"),
        ),
        ("microsoft/resnet-50/model.safetensors".into(), hf_file),
        ("microsoft/resnet-50/config.json".into(), hf_config),
        (
            "timm/resnetv2_50.a1h_in1k/model.safetensors".into(),
            shared("fixtures/timm-resnetv2_50.safetensors"),
        ),
        ("timm/resnetv2_50.a1h_in1k/config.json".into(), timm_config),
    ]);
    let mut hub = MockHub::start(files);
    let cache = dir.join("cache");
    std::env::set_var("HF_ENDPOINT", hub.endpoint());
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1");
    std::env::remove_var("HF_HUB_OFFLINE");

    // torchvision names, architecture given.
    check_logits(
        "hub:timm/resnet50.tv_in1k",
        Some("resnet50"),
        "torchvision-resnet50",
    );
    // transformers names, architecture from config.json.
    let loaded = check_logits("hub:microsoft/resnet-50", None, "torchvision-resnet50");
    assert_eq!(loaded.name, "resnet50");
    // timm resnetv2, architecture and normalisation from config.json, explicit revision and file.
    let loaded = check_logits(
        "hub:timm/resnetv2_50.a1h_in1k@main:model.safetensors",
        None,
        "timm-resnetv2_50",
    );
    assert_eq!(loaded.name, "resnetv2_50");
    assert_eq!(loaded.normalize.unwrap().mean, [0.5; 3]);
    assert!(
        loaded.path.starts_with(&cache),
        "{} is not in the cache",
        loaded.path.display()
    );
    let served = hub.requests();
    assert!(served >= 6, "{served} requests");

    // Second call with the server down: the cache answers.
    hub.shut_down();
    check_logits(
        "hub:timm/resnet50.tv_in1k",
        Some("resnet50"),
        "torchvision-resnet50",
    );
    std::env::set_var("HF_HUB_OFFLINE", "1");
    check_logits("hub:microsoft/resnet-50", None, "torchvision-resnet50");
    // Offline and not cached: a clear error.
    let err = resnet_infer::load_model(Some("resnet18"), "hub:timm/resnet18.a1_in1k", &Device::Cpu)
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("HF_HUB_OFFLINE") && msg.contains("timm/resnet18.a1_in1k"),
        "{msg}"
    );
    std::env::remove_var("HF_HUB_OFFLINE");

    // An unreachable hub from the command line: one error line, no panic.
    let image = shared("data/photos/chelsea.png");
    let out = Command::new(env!("CARGO_BIN_EXE_resnet-infer"))
        .args([
            "classify",
            "--model",
            "resnet18",
            "--weights",
            "hub:timm/resnet18.a1_in1k",
            image.to_str().unwrap(),
        ])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_CACHE", dir.join("empty-cache"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error:") && lines[0].contains("timm/resnet18.a1_in1k"),
        "{stderr}"
    );
}
