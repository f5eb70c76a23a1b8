//! `resnet-infer` as a user runs it: real pretrained weights on real data, classification, summary, bench,
//! and one-line errors for bad input.

use std::process::{Command, Output};
use tests::{assert_one_line_error, cifar10_jpg_root, shared, temp_dir};

fn infer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resnet-infer"))
        .args(args)
        .output()
        .expect("running resnet-infer")
}

/// The last stdout line as JSON (the `--json` contract).
fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("last line is JSON")
}

fn eval_pretrained(model: &str) -> (f64, f64, u64) {
    let weights = shared(&format!("weights/cifar10-{model}.safetensors"));
    let data = cifar10_jpg_root().join("test");
    let out = infer(&[
        "eval",
        "--model",
        model,
        "--weights",
        weights.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    let j = last_json(&out);
    (
        j["top1_error"].as_f64().unwrap(),
        j["top5_error"].as_f64().unwrap(),
        j["images"].as_u64().unwrap(),
    )
}

#[test]
fn pretrained_resnet20_and_32_on_the_real_cifar10_jpeg_test_set() {
    // PyTorch on the same files (PIL decoding): 18.97 / 1.28 and 17.44 / 1.00; ±0.15 points for the JPEG decoder.
    for (model, top1, top5) in [("resnet20", 18.97, 1.28), ("resnet32", 17.44, 1.00)] {
        let (e1, e5, n) = eval_pretrained(model);
        println!("{model}: top-1 {e1:.2} %, top-5 {e5:.2} % on {n} images");
        assert_eq!(n, 10_000);
        assert!((e1 - top1).abs() <= 0.15, "{model}: top-1 {e1} vs {top1}");
        assert!((e5 - top5).abs() <= 0.15, "{model}: top-5 {e5} vs {top5}");
    }
}

#[test]
fn classify_prints_five_imagenet_names_with_probabilities() {
    let weights = shared("fixtures/torchvision-resnet50.safetensors");
    let image = shared("data/photos/chelsea.png");
    let out = infer(&[
        "classify",
        "--model",
        "resnet50",
        "--weights",
        weights.to_str().unwrap(),
        image.to_str().unwrap(),
        "--json",
    ]);
    let j = last_json(&out);
    assert_eq!(j["image"], image.to_str().unwrap());
    let top5 = j["top5"].as_array().unwrap();
    assert_eq!(top5.len(), 5);
    let names = resnet_infer::class_names::imagenet();
    let mut sum = 0.0;
    let mut last = f64::INFINITY;
    for t in top5 {
        let p = t["probability"].as_f64().unwrap();
        let i = t["index"].as_u64().unwrap() as usize;
        assert_eq!(t["name"], names[i].as_str());
        assert!(p <= last, "sorted by probability");
        last = p;
        sum += p;
    }
    assert!(sum > 0.0 && sum <= 1.0 + 1e-6, "sum {sum}");
}

#[test]
fn imagenet_class_names_are_embedded_in_torchvision_order() {
    let names = resnet_infer::class_names::imagenet();
    assert_eq!(names.len(), 1000);
    assert_eq!(names[0], "tench");
    assert_eq!(names[281], "tabby cat");
}

#[test]
fn summary_totals_equal_the_papers() {
    let j = last_json(&infer(&["summary", "--model", "resnet50", "--json"]));
    assert_eq!(j["params"], 25_557_032);
    assert_eq!(j["macs"], 4_089_184_256u64);
    let j = last_json(&infer(&["summary", "--model", "resnet110", "--json"]));
    assert_eq!(j["params"], 1_727_962);
    let layers = j["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1 + 54 + 1);
    assert_eq!(
        layers.last().unwrap()["output"],
        serde_json::json!([10, 1, 1])
    );
}

#[test]
fn bench_reports_throughput_and_peak_memory() {
    for extra in [&[][..], &["--train"][..]] {
        let mut args = vec![
            "bench",
            "--model",
            "resnet20",
            "--batch-size",
            "4",
            "--iterations",
            "1",
            "--json",
        ];
        args.extend_from_slice(extra);
        let j = last_json(&infer(&args));
        assert!(j["images_per_second"].as_f64().unwrap() > 0.0);
        assert!(j["peak_rss_mb"].as_f64().unwrap() > 1.0);
    }
}

#[test]
fn bad_input_gives_one_line_errors() {
    let r20 = shared("weights/cifar10-resnet20.safetensors");
    let r20 = r20.to_str().unwrap();
    let dir = temp_dir("infer-bad-input");
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not an image").unwrap();
    let missing = dir.join("missing.png");
    assert_one_line_error(
        &infer(&[
            "classify",
            "--model",
            "resnet20",
            "--weights",
            r20,
            missing.to_str().unwrap(),
        ]),
        "missing.png",
    );
    assert_one_line_error(
        &infer(&[
            "classify",
            "--model",
            "resnet20",
            "--weights",
            r20,
            text.to_str().unwrap(),
        ]),
        "notes.txt",
    );
    assert_one_line_error(
        &infer(&[
            "classify",
            "--model",
            "resnet56",
            "--weights",
            r20,
            text.to_str().unwrap(),
        ]),
        "missing",
    );
    assert_one_line_error(
        &infer(&[
            "classify",
            "--model",
            "resnet21",
            "--weights",
            r20,
            text.to_str().unwrap(),
        ]),
        "resnet21",
    );
    assert_one_line_error(
        &infer(&[
            "classify",
            "--model",
            "resnet20",
            "--weights",
            text.to_str().unwrap(),
            text.to_str().unwrap(),
        ]),
        "notes.txt",
    );
    assert_one_line_error(
        &infer(&[
            "eval",
            "--model",
            "resnet20",
            "--weights",
            r20,
            "--data",
            dir.join("nowhere").to_str().unwrap(),
        ]),
        "nowhere",
    );
    assert_one_line_error(
        &infer(&["bench", "--model", "resnet20", "--batch-size", "0"]),
        "--batch-size",
    );
    assert_one_line_error(
        &infer(&["bench", "--model", "resnet20", "--device", "cuda:0"]),
        "cuda",
    );
}
