//! `resnet-train` as a user runs it: real CIFAR-10 images, a training loss that falls, exact resume after a
//! kill, damaged checkpoints, a run that diverges, checkpoints that `resnet-infer` reads, and bad flags.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tests::{assert_one_line_error, cifar10_jpg_root, temp_dir};

fn train_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_resnet-train"))
}

fn train(args: &[&str]) -> Output {
    train_cmd()
        .args(args)
        .output()
        .expect("running resnet-train")
}

/// A small ImageFolder of real CIFAR-10 JPEGs: `per_class` training and 20 test images per class (symlinks).
fn small_cifar(name: &str, per_class: usize) -> PathBuf {
    let src = cifar10_jpg_root();
    let root = temp_dir(name);
    for (split, n) in [("train", per_class), ("test", 20)] {
        for class in datasets::cifar_binary::CIFAR10_CLASSES {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            let mut files: Vec<PathBuf> = std::fs::read_dir(src.join(split).join(class))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for f in files.iter().take(n) {
                std::os::unix::fs::symlink(f, dir.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    root
}

/// `(iteration, train_loss cell as written)` of every row of a run's metrics.csv.
fn losses(run: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().unwrap(), f[3].to_string())
        })
        .collect()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "resnet-train failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const QUICK: &[&str] = &["--recipe", "quick", "--log-every", "1", "--seed", "3"];

#[test]
fn sixty_iterations_bring_the_training_loss_clearly_below_ln_10() {
    let data = small_cifar("train-60", 200);
    let out = temp_dir("run-60");
    let mut args = QUICK.to_vec();
    args.extend(["--batch-size", "64", "--iterations", "60"]);
    args.extend([
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&train(&args));
    let rows = losses(&out);
    assert_eq!(rows.len(), 60);
    let last10: f64 = rows[50..]
        .iter()
        .map(|(_, l)| l.parse::<f64>().unwrap())
        .sum::<f64>()
        / 10.0;
    let first: f64 = rows[0].1.parse().unwrap();
    println!("loss: first {first:.3}, mean of the last 10 {last10:.3} (ln 10 = 2.303)");
    assert!(last10 < 2.15, "mean loss of iterations 51–60 is {last10}");

    let png = std::fs::read(out.join("curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "curves.png is a PNG");

    // The checkpoint is read by resnet-infer's evaluation and gives the error the log reported.
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let logged: f64 = csv
        .lines()
        .last()
        .unwrap()
        .split(',')
        .nth(5)
        .unwrap()
        .parse()
        .unwrap();
    let weights = out.join("last.safetensors");
    let loaded =
        resnet_infer::load_model(None, weights.to_str().unwrap(), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(loaded.name, "resnet20");
    let split = datasets::DataSource::open(&data).unwrap().test.unwrap();
    let options = resnet_infer::EvalOptions {
        normalize: loaded.normalize.unwrap(),
        ..Default::default()
    };
    let report = resnet_infer::evaluate(&loaded.model, split, &options).unwrap();
    let error = report.accuracy.top1_error;
    assert!(
        (error - logged).abs() < 1e-4,
        "eval {error} vs logged {logged}"
    );
}

#[test]
fn a_killed_run_resumes_with_exactly_the_same_losses() {
    let data = small_cifar("train-resume", 60);
    let base = |out: &Path| {
        let mut a: Vec<String> = QUICK.iter().map(|s| s.to_string()).collect();
        a.extend(
            [
                "--batch-size",
                "32",
                "--iterations",
                "24",
                "--checkpoint-every",
                "6",
                "--keep",
                "10",
                "--eval-every",
                "0",
            ]
            .map(String::from),
        );
        a.extend([
            "--data".into(),
            data.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ]);
        a
    };
    let straight = temp_dir("run-straight");
    ok(&train_cmd().args(base(&straight)).output().unwrap());

    let killed = temp_dir("run-killed");
    let mut child = train_cmd()
        .args(base(&killed))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !killed.join("ckpt-000000012.safetensors").exists() {
        assert!(Instant::now() < deadline, "no checkpoint at iteration 12");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    ok(&train(&["--resume", killed.to_str().unwrap()]));
    assert_eq!(
        losses(&killed),
        losses(&straight),
        "resumed losses differ from the uninterrupted run"
    );

    // A truncated newest checkpoint is reported and the previous one is used.
    let last = killed.join("last.safetensors");
    let bytes = std::fs::read(&last).unwrap();
    std::fs::write(&last, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(killed.join("ckpt-000000024.safetensors")).unwrap();
    let out = train(&["--resume", killed.to_str().unwrap(), "--iterations", "30"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("damaged checkpoint") && stderr.contains("last.safetensors"),
        "{stderr}"
    );
    assert!(
        stderr.contains("resumed from") && stderr.contains("ckpt-000000018"),
        "{stderr}"
    );

    // Nothing readable at all: a clear error.
    for f in std::fs::read_dir(&killed).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            std::fs::write(&p, b"garbage").unwrap();
        }
    }
    let out = train(&["--resume", killed.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no readable checkpoint"));
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let data = small_cifar("train-nan", 20);
    let out = temp_dir("run-nan");
    let mut args = QUICK.to_vec();
    args.extend([
        "--batch-size",
        "32",
        "--lr",
        "1e30",
        "--iterations",
        "50",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "0",
    ]);
    args.extend([
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let res = train(&args);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    // Whatever was saved holds finite weights.
    let last = out.join("last.safetensors");
    if last.exists() {
        let t = candle_core::safetensors::load(&last, &candle_core::Device::Cpu).unwrap();
        for (name, v) in t {
            let v = v.to_dtype(candle_core::DType::F32).unwrap();
            let s: f32 = v.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(s.is_finite(), "{name} is not finite in the last checkpoint");
        }
    }
}

#[test]
fn bad_flags_give_one_line_errors() {
    let data = small_cifar("train-flags", 2);
    let d = data.to_str().unwrap();
    assert_one_line_error(&train(&["--model", "resnet21", "--data", d]), "resnet21");
    assert_one_line_error(&train(&["--lr=-0.1", "--data", d]), "--lr");
    assert_one_line_error(&train(&["--lr", "fast", "--data", d]), "--lr");
    assert_one_line_error(&train(&["--no-such-flag", "--data", d]), "--no-such-flag");
    assert_one_line_error(&train(&["--batch-size", "0", "--data", d]), "--batch-size");
    assert_one_line_error(&train(&["--recipe", "fast", "--data", d]), "fast");
    assert_one_line_error(
        &train(&["--data", "/nonexistent/cifar"]),
        "/nonexistent/cifar",
    );
    assert_one_line_error(&train(&["--data", d, "--device", "cuda:0"]), "cuda");
    assert_one_line_error(
        &train(&["--resume", "/nonexistent/run"]),
        "/nonexistent/run",
    );
}

#[test]
fn experiment_and_compare_write_a_table_and_a_figure() {
    let data = small_cifar("train-experiment", 4);
    let out = temp_dir("run-experiment");
    let args = [
        "experiment",
        "degradation",
        "--recipe",
        "quick",
        "--batch-size",
        "8",
        "--iterations",
        "3",
    ];
    let res = train_cmd()
        .args(args)
        .args([
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    ok(&res);
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    for model in ["plain20", "plain56", "resnet20", "resnet56"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| {model} |")))
            .unwrap_or_else(|| panic!("{table}"));
        // iterations, final training error, final test error, best test error
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[2], "3", "{row}");
        assert!(cells[4].parse::<f64>().is_ok(), "{row}");
    }
    assert!(std::fs::read(out.join("figure.png"))
        .unwrap()
        .starts_with(b"\x89PNG"));

    let figure = out.join("two.png");
    let runs = [out.join("plain20"), out.join("resnet56")];
    let res = train_cmd()
        .arg("compare")
        .args(&runs)
        .arg("--out")
        .arg(&figure)
        .output()
        .unwrap();
    ok(&res);
    assert!(std::fs::read(&figure).unwrap().starts_with(b"\x89PNG"));
    assert_one_line_error(
        &train(&[
            "compare",
            "/nonexistent/run",
            "--out",
            figure.to_str().unwrap(),
        ]),
        "/nonexistent/run",
    );
}

#[test]
fn bn_recalibration_runs_after_training_when_asked() {
    let data = small_cifar("train-recal", 8);
    let out = temp_dir("run-recal");
    let mut args = QUICK.to_vec();
    args.extend([
        "--batch-size",
        "16",
        "--iterations",
        "3",
        "--bn-recalibrate",
        "2",
    ]);
    args.extend([
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let res = train(&args);
    ok(&res);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("recomputed BatchNorm statistics over 2 training batches"),
        "{stderr}"
    );
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(
        config.contains("\"bn_recalibration_batches\": 2"),
        "{config}"
    );
}

/// With no `--data`, CIFAR-10 comes from the hub (here a loopback mock serving uoft-cs/cifar10's parquet layout)
/// into the HF cache; `--resume` finds the same source in the run's config, with the hub down.
#[test]
fn default_data_comes_from_the_hub() {
    let mut hub = tests::mock_hub::MockHub::start(tests::mock_hub::cifar_dataset_files());
    let work = temp_dir("train-hub");
    let endpoint = hub.endpoint();
    let run = |args: &[&str]| {
        train_cmd()
            .args(args)
            .current_dir(&work)
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HOME", work.join("hf"))
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_HUB_CACHE")
            .output()
            .unwrap()
    };
    let small = ["--batch-size", "4", "--holdout", "4", "--eval-every", "2"];
    let out = run(&[&["--iterations", "2"], &small[..]].concat());
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("hub:uoft-cs/cifar10"), "{stderr}");
    assert!(
        stderr.contains("CIFAR-10 parquet (hub:uoft-cs/cifar10)")
            && stderr.contains("train 12, test 8"),
        "{stderr}"
    );
    // The default run folder is runs/MODEL.
    let dir = work.join("runs/resnet20");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["data"], "hub:uoft-cs/cifar10");
    assert_eq!(losses(&dir).last().unwrap().0, 2);

    hub.shut_down();
    let out = run(&["--resume", dir.to_str().unwrap(), "--iterations", "4"]);
    ok(&out);
    assert_eq!(losses(&dir).last().unwrap().0, 4);
}
