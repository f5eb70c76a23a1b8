//! `resnet-infer` as a user runs it: real pretrained weights on real data, classification, summary, bench,
//! and one-line errors for bad input.

use std::path::Path;
use std::process::{Command, Output};
use tests::{assert_one_line_error, cifar10_jpg_root, shared, small_cifar, temp_dir};

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

/// `resnet-infer eval --json` of `model` with `weights` on `data`, with `extra` flags: the JSON object.
fn eval_weights_json(
    model: &str,
    weights: &Path,
    data: &Path,
    extra: &[&str],
) -> serde_json::Value {
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--weights",
        weights.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    last_json(&infer(&args))
}

/// The same with the pretrained CIFAR-10 `model` of ../shared/weights.
fn eval_json(model: &str, data: &Path, extra: &[&str]) -> serde_json::Value {
    let weights = shared(&format!("weights/cifar10-{model}.safetensors"));
    eval_weights_json(model, &weights, data, extra)
}

fn eval_pretrained(model: &str) -> (f64, f64, u64) {
    let j = eval_json(model, &cifar10_jpg_root().join("test"), &[]);
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
fn imagenet_class_names_are_embedded_in_torchvision_order() {
    let names = resnet_infer::class_names::imagenet();
    assert_eq!(names.len(), 1000);
    assert_eq!(names[0], "tench");
    assert_eq!(names[281], "tabby cat");
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
    let eval = |extra: &[&str]| {
        let data = cifar10_jpg_root().join("test");
        let mut args = vec![
            "eval",
            "--model",
            "resnet20",
            "--weights",
            r20,
            "--data",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        infer(&args)
    };
    assert_one_line_error(
        &eval(&["--ten-crop", "--multi-scale", "32,40"]),
        "--ten-crop and --multi-scale",
    );
    assert_one_line_error(&eval(&["--multi-scale", "0"]), "--multi-scale");
    assert_one_line_error(&eval(&["--crop-pct", "1.5"]), "--crop-pct");
    assert_one_line_error(&eval(&["--batch-size", "0"]), "--batch-size");
    assert_one_line_error(&eval(&["--mean", "0.5,0.5,0.5"]), "--mean and --std");
    assert_one_line_error(&eval(&["--device", "cuda:0"]), "cuda");
    assert_one_line_error(
        &infer(&["summary", "--model", "resnet20", "--classes", "0"]),
        "--classes",
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

/// The fields of an eval report that carry its result.
fn result_of(j: &serde_json::Value) -> (f64, f64, serde_json::Value) {
    (
        j["top1_error"].as_f64().unwrap(),
        j["top5_error"].as_f64().unwrap(),
        j["per_class_accuracy"].clone(),
    )
}

#[test]
fn ten_crop_through_the_cli_equals_pytorchs_protocol() {
    // PyTorch (zero-pad 4, the ten 32×32 crops, softmax averaged) on the same files: 16.90 / 1.11
    // (../shared/README.md); ±0.3 points for the JPEG decoder.
    let j = eval_json(
        "resnet20",
        &cifar10_jpg_root().join("test"),
        &["--ten-crop"],
    );
    let (e1, e5, _) = result_of(&j);
    println!("ten-crop: top-1 {e1:.2} %, top-5 {e5:.2} %");
    assert_eq!(j["images"], 10_000);
    assert_eq!(j["views"], 10);
    assert!((e1 - 16.90).abs() <= 0.3, "top-1 {e1} vs PyTorch 16.90");
    assert!((e5 - 1.11).abs() <= 0.3, "top-5 {e5} vs PyTorch 1.11");
}

#[test]
fn every_eval_flag_reaches_the_evaluation() {
    let data = small_cifar("infer-eval-flags", 0, 30);
    let plain = eval_json("resnet20", &data, &[]);
    assert_eq!(plain["images"], 300);
    assert_eq!(plain["views"], 1);
    assert_eq!(plain["batches"], 2, "default batch size 250");
    assert_eq!(plain["bn_folded"], true);

    // --multi-scale: whole images at each size, one image per forward pass; it changes the result, and equals
    // the library's protocol (checked view by view against the unfolded network in protocols.rs).
    let multi = eval_json("resnet20", &data, &["--multi-scale", "32,40"]);
    assert_eq!(multi["views"], 2);
    assert_eq!(multi["batches"], 600);
    assert_ne!(result_of(&multi), result_of(&plain));
    let weights = shared("weights/cifar10-resnet20.safetensors");
    let loaded = resnet_infer::load_model(
        Some("resnet20"),
        weights.to_str().unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let split = datasets::DataSource::open(&data).unwrap().test.unwrap();
    let options = resnet_infer::EvalOptions {
        scales: vec![32, 40],
        ..Default::default()
    };
    let library = resnet_infer::evaluate(&loaded.model, split, &options).unwrap();
    assert_eq!(
        multi["top1_error"].as_f64().unwrap(),
        library.accuracy.top1_error
    );

    // --batch-size: the number of forward passes, not the result.
    let batched = eval_json("resnet20", &data, &["--batch-size", "7"]);
    assert_eq!(batched["batches"], 43);
    assert_eq!(result_of(&batched), result_of(&plain));

    // --no-fold: BatchNorm kept as separate layers (same predictions within 1e-4 relative logits).
    let unfolded = eval_json("resnet20", &data, &["--no-fold"]);
    assert_eq!(unfolded["bn_folded"], false);
    assert_eq!(unfolded["top1_error"], plain["top1_error"]);

    // --mean/--std replace the weights' own normalisation (ImageNet statistics in the file's metadata).
    let cifar_stats = [
        "--mean",
        "0.4914,0.4822,0.4465",
        "--std",
        "0.2470,0.2435,0.2616",
    ];
    let renormalised = eval_json("resnet20", &data, &cifar_stats);
    assert_ne!(result_of(&renormalised), result_of(&plain));

    // --dataset cifar10 normalises with CIFAR-10's statistics when the weights carry none; without it, ImageNet's.
    let dir = temp_dir("infer-bare-weights");
    let bare = dir.join("resnet20-no-metadata.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&tensors, &bare).unwrap();
    let eval_bare = |extra: &[&str]| eval_weights_json("resnet20", &bare, &data, extra);
    assert_eq!(
        result_of(&eval_bare(&["--dataset", "cifar10"])),
        result_of(&renormalised)
    );
    assert_eq!(result_of(&eval_bare(&[])), result_of(&plain));
    // An explicit --mean/--std still wins over --dataset.
    let imagenet_stats = [
        "--dataset",
        "cifar10",
        "--mean",
        "0.485,0.456,0.406",
        "--std",
        "0.229,0.224,0.225",
    ];
    assert_eq!(result_of(&eval_bare(&imagenet_stats)), result_of(&plain));
}

#[test]
fn unreadable_images_are_skipped_and_counted_or_stop_the_run_with_strict() {
    let data = small_cifar("infer-strict", 0, 3);
    let broken = data.join("test/cat/broken.jpg");
    std::fs::write(&broken, b"not a jpeg").unwrap();
    let j = eval_json("resnet20", &data, &[]);
    assert_eq!(j["images"], 30);
    let skipped = j["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].as_str().unwrap().contains("broken.jpg"));
    let weights = shared("weights/cifar10-resnet20.safetensors");
    assert_one_line_error(
        &infer(&[
            "eval",
            "--model",
            "resnet20",
            "--weights",
            weights.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--strict",
        ]),
        "broken.jpg",
    );
}

#[test]
fn dataset_flag_refuses_data_or_a_head_of_another_class_count() {
    let weights = shared("weights/cifar10-resnet20.safetensors");
    let eval = |data: &Path, dataset: &str| {
        infer(&[
            "eval",
            "--model",
            "resnet20",
            "--weights",
            weights.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--dataset",
            dataset,
        ])
    };
    let ten = small_cifar("infer-dataset-10", 0, 1);
    assert_one_line_error(
        &eval(&ten, "cifar100"),
        "--dataset cifar100 has 100 classes, but the data has 10",
    );
    assert_one_line_error(
        &eval(&ten, "imagenet"),
        "--dataset imagenet has 1000 classes, but the data has 10",
    );
    // 100 classes of data, the pretrained net's 10-class head.
    let hundred = temp_dir("infer-dataset-100");
    let image = std::fs::read_dir(cifar10_jpg_root().join("test/cat"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for i in 0..100 {
        let dir = hundred.join(format!("test/class{i:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(&image, dir.join("0.jpg")).unwrap();
    }
    assert_one_line_error(
        &eval(&hundred, "cifar100"),
        "--dataset cifar100 has 100 classes, but the network's head has 10 outputs",
    );
    assert_one_line_error(&eval(&ten, "svhn"), "svhn");
}

/// `classify --json`: one object per image, in order.
fn classify_json(args: &[&str]) -> Vec<serde_json::Value> {
    let out = infer(&[&["classify", "--json"], args].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn classify_names_the_original_cifar10_test_pngs() {
    // ../shared/README.md: ResNet-20 gets all 20 right; ResNet-32 19 of 20 (test-15, a ship, predicted 6: frog).
    let mut pngs: Vec<String> = std::fs::read_dir(shared("data/cifar10-test-png"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    pngs.sort();
    assert_eq!(pngs.len(), 20);
    let names = datasets::cifar_binary::CIFAR10_CLASSES;
    for (model, exception) in [("resnet20", None), ("resnet32", Some((15, 6)))] {
        let weights = shared(&format!("weights/cifar10-{model}.safetensors"));
        let mut args = vec!["--model", model, "--weights", weights.to_str().unwrap()];
        args.extend(pngs.iter().map(String::as_str));
        let results = classify_json(&args);
        assert_eq!(results.len(), 20);
        for (i, (r, png)) in results.iter().zip(&pngs).enumerate() {
            assert_eq!(r["image"], png.as_str());
            let label: usize = png
                .trim_end_matches(".png")
                .rsplit("label-")
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let expected = match exception {
                Some((j, class)) if j == i => class,
                _ => label,
            };
            let top = &r["top5"][0];
            assert_eq!(top["index"], expected, "{model} on {png}");
            assert_eq!(top["name"], names[expected]);
        }
    }
}

#[test]
fn classify_flags_change_the_preprocessing_and_the_network() {
    // The fixture's weights are PyTorch's, with realistic BN statistics but not ImageNet-trained: only the
    // changes each flag makes are asserted here (the fixture parity tests check the logits themselves).
    let weights = shared("fixtures/torchvision-resnet50.safetensors");
    let image = shared("data/photos/chelsea.png");
    let run = |extra: &[&str]| -> Vec<(u64, f64)> {
        let mut args = vec![
            "--model",
            "resnet50",
            "--weights",
            weights.to_str().unwrap(),
            image.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let r = classify_json(&args).remove(0);
        r["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let i = t["index"].as_u64().unwrap();
                assert_eq!(
                    t["name"],
                    resnet_infer::class_names::imagenet()[i as usize].as_str()
                );
                (i, t["probability"].as_f64().unwrap())
            })
            .collect()
    };
    let base = run(&[]);
    assert_eq!(base.len(), 5);
    assert!(
        base.windows(2).all(|w| w[0].1 >= w[1].1),
        "sorted: {base:?}"
    );
    let total: f64 = base.iter().map(|t| t.1).sum();
    assert!(total > 0.0 && total <= 1.0 + 1e-6);
    // --crop-pct: another centre crop; --mean/--std: other pixels.
    assert_ne!(run(&["--crop-pct", "0.5"]), base);
    assert_ne!(
        run(&["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]),
        base
    );
    // --no-fold: the unfolded network, the same probabilities to float rounding.
    let unfolded = run(&["--no-fold"]);
    assert_ne!(unfolded, base, "BatchNorm folding changes the rounding");
    for (u, b) in unfolded.iter().zip(&base) {
        assert_eq!(u.0, b.0);
        assert!((u.1 - b.1).abs() <= 1e-4 * b.1.max(1e-3), "{u:?} vs {b:?}");
    }
}

#[test]
fn summary_flags_change_the_counts() {
    let j = last_json(&infer(&["summary", "--model", "resnet50", "--json"]));
    assert_eq!(j["params"], 25_557_032);
    assert_eq!(j["macs"], 4_089_184_256u64);
    assert_eq!(j["input"], 224);
    // --input 448: every convolution does 4× the multiply-adds; the 2048→1000 head stays.
    let head = 2048 * 1000;
    let j = last_json(&infer(&[
        "summary", "--model", "resnet50", "--input", "448", "--json",
    ]));
    assert_eq!(j["input"], 448);
    assert_eq!(
        j["macs"].as_u64().unwrap() - head,
        4 * (4_089_184_256 - head)
    );
    // --classes 10: a 2048→10 head.
    let j = last_json(&infer(&[
        "summary",
        "--model",
        "resnet50",
        "--classes",
        "10",
        "--json",
    ]));
    assert_eq!(j["params"], 25_557_032 - 990 * 2049);
    let j = last_json(&infer(&["summary", "--model", "resnet110", "--json"]));
    assert_eq!(j["params"], 1_727_962);
    let layers = j["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1 + 54 + 1);
    assert_eq!(
        layers.last().unwrap()["output"],
        serde_json::json!([10, 1, 1])
    );
    // Without --json: the table and its total.
    let out = infer(&["summary", "--model", "resnet110"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("total: 1727962 parameters"), "{text}");
}

#[test]
fn bench_flags_reach_the_measurement() {
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--model",
            "resnet20",
            "--batch-size",
            "3",
            "--iterations",
            "2",
            "--input",
            "40",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = infer(&args);
        (
            last_json(&out),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (j, _) = bench(&[]);
    assert_eq!(j["model"], "resnet20");
    assert_eq!(j["mode"], "inference (BN folded)");
    assert_eq!(j["batch_size"], 3);
    assert_eq!(j["iterations"], 2);
    assert_eq!(j["input"], 40);
    assert_eq!(j["device"], "cpu");
    // The throughput is the images of the timed iterations over their time.
    assert_eq!(j["images"], 6);
    let ips = j["images_per_second"].as_f64().unwrap();
    let seconds = j["seconds"].as_f64().unwrap();
    assert!(
        (ips * seconds - 6.0).abs() < 1e-6,
        "{ips} img/s × {seconds} s"
    );
    assert!(j["peak_rss_mb"].as_f64().unwrap() > 1.0);
    assert!(j["forward_ms"].is_null());

    let (j, _) = bench(&["--no-fold"]);
    assert_eq!(j["mode"], "inference");

    let (j, stdout) = bench(&["--train"]);
    assert_eq!(j["mode"], "train step");
    // A CIFAR net of the first paper trains on channel-blocked tensors with the AVX2 and AVX-512 kernels.
    let blocked = j["isa"] != "generic";
    assert_eq!(
        j["activations"],
        if blocked { "channel-blocked" } else { "NCHW" },
        "{j}"
    );
    if blocked {
        assert!(
            stdout.contains("train step on channel-blocked tensors"),
            "{stdout}"
        );
    }
    let phases: Vec<f64> = ["forward_ms", "backward_ms", "update_ms"]
        .iter()
        .map(|k| j[k].as_f64().unwrap())
        .collect();
    assert!(phases.iter().all(|&ms| ms > 0.0), "{phases:?}");
    // The phases are parts of the timed steps.
    assert!(phases.iter().sum::<f64>() <= j["seconds"].as_f64().unwrap() * 1e3 / 2.0 + 1e-6);

    // What the forward keeps for backward: at least the 19 activations of 16×40×40 of the first stage's
    // convolutions (3 images, f32), at most 3 tensors per convolution of the whole net.
    let saved = j["saved_activations_mb"].as_f64().unwrap();
    let stage1 = 3.0 * 16.0 * 40.0 * 40.0 * 4.0 / 1e6;
    assert!(
        saved > 7.0 * 2.0 * stage1 && saved < 19.0 * 3.0 * stage1,
        "{saved} MB"
    );
    // Recomputation keeps only the segment boundaries (3 segments of 9 units: 3 tensors and the head's).
    let (r, stdout) = bench(&["--train", "--recompute"]);
    assert_eq!(r["mode"], "train step");
    let recomputed = r["saved_activations_mb"].as_f64().unwrap();
    assert!(recomputed < saved / 4.0, "{recomputed} vs {saved} MB");
    assert!(
        stdout.contains("saved for backward after the forward pass"),
        "{stdout}"
    );
    assert_one_line_error(
        &infer(&["bench", "--model", "resnet20", "--recompute"]),
        "--recompute applies to a training step",
    );

    let (j, stdout) = bench(&["--convs"]);
    assert!(stdout.contains("| 16→16 3×3/1 on 40×40 | 6 |"), "{stdout}");
    // The stem's input gradient, which training never computes, is not timed.
    let stem = stdout
        .lines()
        .find(|l| l.starts_with("| 3→16 3×3/1 on 40×40 | 1 |"));
    assert!(
        stem.is_some_and(|l| l.contains("| – (net input) |") && l.contains(", –, ")),
        "{stdout}"
    );
    assert!(stdout.contains("all convolutions of the net"), "{stdout}");
    // Each pass's share of the FMA peak, which --convs measures, and the algorithm that ran.
    assert!(j["peak_gflops"].as_f64().unwrap() > 0.0);
    assert!(stdout.contains(" %) |"), "{stdout}");
    assert!(
        ["Im2colGemm", "PointwiseGemm", "Blocked", "Winograd"]
            .iter()
            .any(|a| stdout.contains(&format!("| {a}"))),
        "{stdout}"
    );
    // Without --train the passes are timed on NCHW tensors; with it, on the layout the training step ran on
    // (channel-blocked for ResNet-20 wherever a vector kernel set runs), the stem writing blocks.
    assert!(stdout.contains("| conv (batch 3, NCHW) |"), "{stdout}");
    let (j, stdout) = bench(&["--train", "--convs"]);
    let layout = j["activations"].as_str().unwrap();
    let expected = match j["isa"].as_str().unwrap() {
        "generic" => "NCHW",
        _ => "channel-blocked",
    };
    assert_eq!(layout, expected);
    assert!(
        stdout.contains(&format!("| conv (batch 3, {layout}) |")),
        "{stdout}"
    );
    if layout == "channel-blocked" {
        assert_eq!(
            stdout.matches("| Blocked, Blocked, Blocked |").count(),
            5,
            "{stdout}"
        );
        assert!(stdout.contains("| Blocked, –, Blocked |"), "{stdout}");
    }
    // The same timings in the JSON: ResNet-20's six distinct convolutions, the stem first (no input gradient).
    let convs = j["convs"].as_array().unwrap();
    assert_eq!(convs.len(), 6, "{convs:?}");
    assert_eq!(convs[0]["shape"]["in_channels"], 3);
    assert_eq!(convs[0]["shape"]["input"], serde_json::json!([40, 40]));
    assert!(convs[0]["passes"][1].is_null());
    assert_eq!(convs[1]["count"], 6);
    for conv in convs {
        let passes = conv["passes"].as_array().unwrap();
        assert_eq!(passes.len(), 3);
        for pass in passes.iter().filter(|p| !p.is_null()) {
            assert!(pass["gflops"].as_f64().unwrap() > 0.0, "{pass}");
            assert!(pass["algorithm"].is_string(), "{pass}");
        }
    }
    let (j, stdout) = bench(&["--peak"]);
    assert!(j["peak_gflops"].as_f64().unwrap() > 0.0);
    assert!(stdout.contains("f32 FMA peak"), "{stdout}");
    let (j, _) = bench(&[]);
    assert!(j["peak_gflops"].is_null());
    assert!(j.get("convs").is_none(), "{j}");
}

/// The kernel set: the best this CPU has by default, `RESNET_CPU_ISA` forces a narrower one, and the bench
/// says which ran on its first line and in its JSON.
#[test]
fn cpu_kernel_set_is_chosen_reported_and_checked() {
    let run = |isa: Option<&str>, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_resnet-infer"));
        c.args(args);
        if let Some(isa) = isa {
            c.env("RESNET_CPU_ISA", isa);
        }
        c.output().expect("running resnet-infer")
    };
    let net = [
        "bench",
        "--model",
        "resnet8",
        "--batch-size",
        "2",
        "--iterations",
        "1",
        "--json",
    ];
    let best = last_json(&run(None, &net));
    let best = best["isa"].as_str().unwrap().to_string();
    assert!(
        ["avx512", "avx2", "generic"].contains(&best.as_str()),
        "{best}"
    );
    let out = run(Some("generic"), &net);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(last_json(&out)["isa"], "generic");
    assert!(
        stdout.lines().next().unwrap().contains("generic kernels"),
        "{stdout}"
    );

    // --peak alone: one line and, with --json, the figure.
    let j = last_json(&run(Some("generic"), &["bench", "--peak", "--json"]));
    assert_eq!(j["isa"], "generic");
    assert!(j["peak_gflops"].as_f64().unwrap() > 0.0 && j["threads"].as_u64().unwrap() >= 1);

    assert_one_line_error(
        &run(Some("sse9"), &net),
        "RESNET_CPU_ISA=sse9: expected one of avx512, avx2, generic",
    );
    // Which algorithm training's convolutions run follows the kernel set: with avx2 and avx512 the blocked
    // kernel (`bench --convs` names it per pass), with generic code never; the blocked inference forward is
    // timed on all.
    let convs = |isa: &str| {
        let out = run(Some(isa), &[&net[..7], &["--convs"]].concat());
        assert!(out.status.success(), "{isa}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let vector_sets: &[&str] = match best.as_str() {
        "avx512" => &["avx2", "avx512"],
        "avx2" => &["avx2"],
        _ => &[],
    };
    for isa in vector_sets {
        let table = convs(isa);
        assert!(
            table.contains("| Blocked, Blocked, Blocked |"),
            "{isa}: {table}"
        );
        assert!(
            table.contains("blocked inference forward:"),
            "{isa}: {table}"
        );
    }
    let generic = convs("generic");
    assert!(!generic.contains("Blocked,"), "{generic}");
    assert!(generic.contains("blocked inference forward:"), "{generic}");
    if best != "avx512" {
        assert_one_line_error(
            &run(Some("avx512"), &net),
            "this CPU does not run avx512 kernels",
        );
    }
    assert_one_line_error(&run(None, &["bench"]), "not provided: --model");
    assert_one_line_error(&run(None, &["bench", "--peak", "--train"]), "add --model");
}

/// `bench --convs` marks the layers that folded inference runs by Winograd's algorithm on the blocked layout:
/// ResNet-50's 3×3 stride-1 layers at batch 2 on 56×56 and 28×28 (F(4×4) tiles, enough of them), not the ones on
/// 7×7 (two images' 16 F(2×2) tiles each are too few), on every kernel set.
#[test]
fn convs_table_marks_the_blocked_winograd_layers() {
    let isas: &[&str] = if cfg!(target_arch = "x86_64") {
        &["generic", "avx2"]
    } else {
        &["generic"]
    };
    for isa in isas {
        let out = Command::new(env!("CARGO_BIN_EXE_resnet-infer"))
            .args([
                "bench",
                "--model",
                "resnet50",
                "--batch-size",
                "2",
                "--iterations",
                "1",
                "--convs",
            ])
            .env("RESNET_CPU_ISA", isa)
            .output()
            .expect("running resnet-infer");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            // A CPU without AVX2 refuses the avx2 kernel set (checked by the test above).
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("does not run"),
                "{out:?}"
            );
            continue;
        }
        let row = |name: &str| {
            stdout
                .lines()
                .find(|l| l.starts_with(&format!("| {name} |")))
                .unwrap_or_else(|| panic!("{isa}: no row {name}: {stdout}"))
                .to_string()
        };
        assert!(
            row("128→128 3×3/1 on 28×28").ends_with(" Winograd |"),
            "{isa}: {stdout}"
        );
        assert!(
            row("64→64 3×3/1 on 56×56").ends_with(" Winograd |"),
            "{isa}: {stdout}"
        );
        assert!(
            !row("512→512 3×3/1 on 7×7").ends_with(" Winograd |"),
            "{isa}: {stdout}"
        );
    }
}

/// No leak over a long run: after 200 training steps the heap holds what it held after 20, and the peak RSS is
/// the same up to where the allocator's 32 MiB segments settle (seen: 87–102 MB for either count).
#[test]
fn memory_after_200_training_steps_is_that_after_20() {
    let run = |iterations: &str| {
        // One worker thread: the per-thread im2col column buffers then fill in the first step,
        // not whenever the scheduler first hands a thread a given layer.
        let out = Command::new(env!("CARGO_BIN_EXE_resnet-infer"))
            .args([
                "bench",
                "--model",
                "resnet8",
                "--batch-size",
                "32",
                "--train",
                "--json",
            ])
            .args(["--iterations", iterations])
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .expect("running resnet-infer");
        let j = last_json(&out);
        (
            j["live_heap_mb"].as_f64().unwrap(),
            j["peak_rss_mb"].as_f64().unwrap(),
        )
    };
    let ((live_short, rss_short), (live_long, rss_long)) = (run("20"), run("200"));
    // Parameters, momenta and caches: a few MB, not zero (the count is wired), and not a byte more later.
    assert!(live_short > 1.0, "{live_short} MB in use");
    assert!(
        (live_long - live_short).abs() < 0.064,
        "heap in use {live_long} MB after 200 steps, {live_short} MB after 20"
    );
    assert!(
        rss_long <= rss_short + 32.0,
        "peak RSS {rss_long} MB after 200 steps, {rss_short} MB after 20"
    );
}

/// Output into a pipe that is closed early (`… | head -1`): the process ends without a panic.
#[test]
fn closed_stdout_ends_the_process_without_a_panic() {
    tests::assert_quiet_on_closed_stdout(Command::new(env!("CARGO_BIN_EXE_resnet-infer")).args([
        "bench",
        "--model",
        "resnet8",
        "--batch-size",
        "1",
        "--iterations",
        "1",
        "--convs",
    ]));
}
