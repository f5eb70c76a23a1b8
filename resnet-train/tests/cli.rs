//! `resnet-train` as a user runs it: real CIFAR-10 images, a training loss that falls, exact resume after a
//! kill, damaged checkpoints, a run that diverges, checkpoints that `resnet-infer` reads, and bad flags.

use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tests::{assert_one_line_error, temp_dir};

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
    tests::small_cifar(name, per_class, 20)
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
    let diverge = |name: &str, lr: &str| {
        let mut args = QUICK.to_vec();
        args.extend([
            "--batch-size",
            "32",
            "--lr",
            lr,
            "--iterations",
            "50",
            "--checkpoint-every",
            "1",
            "--eval-every",
            "0",
        ]);
        let out = temp_dir(name);
        let res = train_cmd()
            .args(&args)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
        assert!(!res.status.success(), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let error = stderr.lines().last().unwrap().to_string();
        assert!(
            error.starts_with("error:") && error.contains("training stopped"),
            "{stderr}"
        );
        (out, error)
    };
    // lr 1e4 (seed 3): iterations 1–2 stay finite, the BN statistics overflow at iteration 3.
    let (out, error) = diverge("run-nan", "1e4");
    let last = out.join("last.safetensors");
    assert!(error.contains("at iteration 3"), "{error}");
    assert!(error.contains(&last.display().to_string()), "{error}");
    let metadata = resnet_core::weights::read_metadata(&last).unwrap();
    let state: serde_json::Value = serde_json::from_str(&metadata["training_state"]).unwrap();
    assert_eq!(state["iteration"], 2);
    let t = candle_core::safetensors::load(&last, &candle_core::Device::Cpu).unwrap();
    for (name, v) in t {
        let v = v.to_dtype(candle_core::DType::F32).unwrap();
        let values = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            values.iter().all(|x| x.is_finite()),
            "{name} is not finite in the last checkpoint"
        );
    }
    // lr 1e30 overflows at the first step: no checkpoint exists, and the message does not claim one.
    let (out, error) = diverge("run-nan-at-once", "1e30");
    assert!(!out.join("last.safetensors").exists());
    assert!(
        error.contains("no checkpoint had been written yet"),
        "{error}"
    );
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
    assert_one_line_error(
        &train_cmd()
            .env("RESNET_CPU_ISA", "sse9")
            .args(["--data", d])
            .output()
            .unwrap(),
        "RESNET_CPU_ISA=sse9",
    );
    assert_one_line_error(&train(&["--accumulate", "0", "--data", d]), "--accumulate");
    // Outside mpirun: the build without MPI says how to get it; the one with MPI, how to launch it.
    let distributed = train(&["--distributed", "--data", d]);
    match cfg!(feature = "mpi") {
        true => assert_one_line_error(&distributed, "--distributed needs an MPI launcher"),
        false => assert_one_line_error(
            &distributed,
            "--distributed needs a build with the `mpi` feature: cargo build --release -p resnet-train --features mpi",
        ),
    }
    assert_one_line_error(
        &train(&["experiment", "degradation", "--distributed", "--data", d]),
        "--distributed applies to a single training run",
    );
}

/// `resnet-train experiment ARGS… --data DATA --out OUT`, which must succeed and write a figure; its table.md.
fn run_experiment(args: &[&str], data: &Path, out: &Path) -> String {
    let res = train_cmd()
        .arg("experiment")
        .args(args)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    ok(&res);
    assert!(std::fs::read(out.join("figure.png"))
        .unwrap()
        .starts_with(b"\x89PNG"));
    std::fs::read_to_string(out.join("table.md")).unwrap()
}

/// The cells of the table row whose first cell is `first`.
fn table_row(table: &str, first: &str) -> Vec<String> {
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("| {first} |")))
        .unwrap_or_else(|| panic!("no row {first} in\n{table}"));
    row.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

#[test]
fn experiment_and_compare_write_a_table_and_a_figure() {
    let data = small_cifar("train-experiment", 4);
    let out = temp_dir("run-experiment");
    let table = run_experiment(
        &[
            "degradation",
            "--recipe",
            "quick",
            "--batch-size",
            "8",
            "--iterations",
            "3",
        ],
        &data,
        &out,
    );
    for model in ["plain20", "plain56", "resnet20", "resnet56"] {
        // model, iterations, final training error, final test error, best test error
        let cells = table_row(&table, model);
        assert_eq!(cells[1], "3", "{cells:?}");
        assert!(cells[3].parse::<f64>().is_ok(), "{cells:?}");
    }

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

/// `resnet-train experiment … | head -0`: the process ends at its first write to the closed standard output
/// (the line that ends the first net's run) as a C program does, without a panic and with that run complete.
#[test]
fn closed_stdout_ends_an_experiment_without_a_panic() {
    let data = small_cifar("train-closed-stdout", 2);
    let out = temp_dir("run-closed-stdout");
    tests::assert_quiet_on_closed_stdout(
        train_cmd()
            .args(["experiment", "degradation", "--recipe", "quick"])
            .args(["--batch-size", "4", "--iterations", "1"])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out),
    );
    let first = out.join("plain20");
    assert_eq!(losses(&first).len(), 1, "{}", first.display());
    assert!(first.join("last.safetensors").is_file());
    assert!(!out.join("resnet56").exists(), "the experiment went on");
}

/// `--bn-recalibrate N`: the first BatchNorm's statistics in the final checkpoint are the plain averages, over the
/// next epoch's first N training batches, of the batch mean and unbiased variance of conv1's output, computed
/// here directly from the images and the checkpoint's conv1 weight.
#[test]
fn bn_recalibration_sets_the_plain_average_over_training_batches() {
    use candle_core::{Device, Tensor};
    let data = small_cifar("train-recal", 8);
    let mut args = QUICK.to_vec();
    args.extend([
        "--batch-size",
        "16",
        "--iterations",
        "3",
        "--eval-every",
        "0",
        "--bn-recalibrate",
        "2",
    ]);
    let run = run_with("run-recal", &data, &args);
    assert_eq!(run.config["recipe"]["bn_recalibration_batches"], 2);

    let last = run.dir.join("last.safetensors");
    let tensors = candle_core::safetensors::load(&last, &Device::Cpu).unwrap();
    let metadata = resnet_core::weights::read_metadata(&last).unwrap();
    let state: serde_json::Value = serde_json::from_str(&metadata["training_state"]).unwrap();
    let epoch = state["epoch"].as_u64().unwrap();
    // The trainer's loader: same split, transform, seed and batch size.
    let split = datasets::DataSource::open(&data).unwrap().train.unwrap();
    let loader = datasets::Loader::new(
        split,
        datasets::Pipeline::new(
            datasets::Augmentation::CifarTrain { padding: 4 },
            datasets::Normalization::PerChannel(datasets::Normalize::CIFAR10),
        ),
        datasets::LoaderConfig {
            batch_size: 16,
            shuffle: true,
            seed: 3,
            drop_last: true,
            ..Default::default()
        },
    )
    .unwrap();
    let conv1 = &tensors["conv1.weight"];
    let (mut mean, mut var) = (vec![0f64; 16], vec![0f64; 16]);
    for batch in loader.epoch(epoch + 1, 0).take(2) {
        let (x, _) = batch.unwrap().to_tensors(&Device::Cpu).unwrap();
        let y = x.conv2d(conv1, 1, 1, 1, 1).unwrap(); // [16, 16, 32, 32]
        let per_channel: Vec<Vec<f32>> = y
            .transpose(0, 1)
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (c, values) in per_channel.iter().enumerate() {
            let n = values.len() as f64;
            let m = values.iter().map(|&v| v as f64).sum::<f64>() / n;
            let v = values.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / (n - 1.0);
            mean[c] += m / 2.0;
            var[c] += v / 2.0;
        }
    }
    let saved = |name: &str| -> Vec<f64> {
        let t: &Tensor = &tensors[name];
        t.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    for (name, want) in [("bn1.running_mean", &mean), ("bn1.running_var", &var)] {
        for (got, want) in saved(name).iter().zip(want.iter()) {
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1e-2),
                "{name}: {got} vs {want} computed directly"
            );
        }
    }
    assert!(
        run.stderr
            .contains("recomputed BatchNorm statistics over 2 training batches"),
        "{}",
        run.stderr
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

/// Every cell of every row of a run's metrics.csv (iteration, epoch, lr, train_loss, train_error,
/// test_top1_error, test_top5_error, images_per_second).
fn metrics(run: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(String::from).collect())
        .collect()
}

/// Column `c` of every metrics row.
fn column(rows: &[Vec<String>], c: usize) -> Vec<String> {
    rows.iter().map(|r| r[c].clone()).collect()
}

/// A finished run of `args` on `data` in a fresh folder: the folder, metrics rows, config.json and stderr.
struct Run {
    dir: PathBuf,
    rows: Vec<Vec<String>>,
    config: serde_json::Value,
    stderr: String,
}

fn run_with(name: &str, data: &Path, args: &[&str]) -> Run {
    let dir = temp_dir(name);
    let out = train_cmd()
        .args(args)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    ok(&out);
    let config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    Run {
        rows: metrics(&dir),
        config,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        dir,
    }
}

/// Index of the first row whose loss differs between two runs (None: identical losses).
fn first_loss_difference(a: &Run, b: &Run) -> Option<usize> {
    column(&a.rows, 3)
        .iter()
        .zip(column(&b.rows, 3))
        .position(|(x, y)| *x != y)
}

/// Each training flag changes what it names: the recipe saved in config.json and the run itself (losses,
/// learning rates, rows, checkpoints, the data split). If a flag were parsed and dropped, its check fails.
#[test]
fn every_training_flag_changes_the_run() {
    let data = small_cifar("train-every-flag", 4); // 40 training images, 200 test images
                                                   // The defaults of these runs; a variant's own value of a flag replaces its default.
    let defaults = [
        ("--recipe", "quick"),
        ("--log-every", "1"),
        ("--seed", "3"),
        ("--model", "resnet8"),
        ("--batch-size", "8"),
        ("--iterations", "4"),
        ("--eval-every", "0"),
    ];
    let run = |name: &str, extra: &[&str]| {
        let mut args = Vec::new();
        for (flag, value) in defaults {
            let replaced =
                extra.contains(&flag) || (flag == "--iterations" && extra.contains(&"--epochs"));
            if !replaced {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        run_with(name, &data, &args)
    };
    let base = run("flag-base", &[]);
    assert_eq!(column(&base.rows, 0), ["1", "2", "3", "4"]);
    assert_eq!(
        column(&base.rows, 1),
        ["0", "0", "0", "0"],
        "5 batches of 8 per epoch"
    );
    assert_eq!(column(&base.rows, 2), ["0.1"; 4]);
    let recipe = |r: &Run, key: &str| r.config["recipe"].pointer(key).cloned().unwrap();

    // Optimiser flags: the first loss after the first update differs (after the second with momentum, whose
    // first buffer is the gradient itself), and the recipe records the value.
    for (flag, value, key, differs_from_row) in [
        ("--lr", "0.3", "/sgd/lr", 1),
        ("--momentum", "0.5", "/sgd/momentum", 2),
        ("--weight-decay", "0.05", "/sgd/weight_decay", 1),
        ("--label-smoothing", "0.2", "/label_smoothing", 0),
    ] {
        let r = run(&format!("flag{flag}"), &[flag, value]);
        let v: f64 = value.parse().unwrap();
        assert_eq!(recipe(&r, key), v, "{flag}");
        assert_eq!(
            first_loss_difference(&r, &base),
            Some(differs_from_row),
            "{flag}"
        );
    }
    let lr_run = run("flag-lr-column", &["--lr", "0.3"]);
    assert_eq!(column(&lr_run.rows, 2), ["0.3"; 4]);
    let nesterov = run("flag-nesterov", &["--nesterov"]);
    assert_eq!(recipe(&nesterov, "/sgd/nesterov"), true);
    assert_eq!(first_loss_difference(&nesterov, &base), Some(1));
    // BN parameters without decay: visible next to a strong decay.
    let decay = run("flag-decay", &["--weight-decay", "0.05"]);
    let no_norm_decay = run(
        "flag-no-decay-norm-bias",
        &["--weight-decay", "0.05", "--no-decay-norm-bias"],
    );
    assert_eq!(recipe(&no_norm_decay, "/sgd/decay_norm_and_bias"), false);
    assert_eq!(first_loss_difference(&no_norm_decay, &decay), Some(1));

    // Model, initialisation and seed: the very first loss differs.
    let zero = run("flag-zero-init", &["--zero-init-residual"]);
    assert_eq!(recipe(&zero, "/zero_init_residual"), true);
    assert_eq!(zero.config["network"]["zero_init_residual"], true);
    assert_eq!(first_loss_difference(&zero, &base), Some(0));
    let seeded = run("flag-seed", &["--seed", "4"]);
    assert_eq!(seeded.config["seed"], 4);
    assert_eq!(first_loss_difference(&seeded, &base), Some(0));
    let deeper = run("flag-model", &["--model", "resnet14"]);
    assert_eq!(first_loss_difference(&deeper, &base), Some(0));
    let loaded = resnet_infer::load_model(
        None,
        deeper.dir.join("last.safetensors").to_str().unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(loaded.name, "resnet14");
    assert_eq!(
        loaded.model.parameter_count(),
        resnet_core::Model::by_name("resnet14", 0, &candle_core::Device::Cpu)
            .unwrap()
            .parameter_count()
    );

    // Schedule: the learning rate of each logged step.
    let stepped = run("flag-milestones", &["--milestones", "2"]);
    let lrs: Vec<f64> = column(&stepped.rows, 2)
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    for (lr, want) in lrs.iter().zip([0.1, 0.1, 0.01, 0.01]) {
        assert!((lr - want).abs() < 1e-12, "{lrs:?}");
    }
    assert_eq!(
        recipe(&stepped, "/schedule"),
        serde_json::json!({"kind": "step", "milestones": [2], "factor": 0.1})
    );
    // --recipe: cifar-paper warms ResNet-110 up at lr 0.01; quick does not.
    let paper = run_with(
        "flag-recipe",
        &data,
        &[
            "--recipe",
            "cifar-paper",
            "--model",
            "resnet110",
            "--batch-size",
            "8",
            "--iterations",
            "1",
            "--log-every",
            "1",
        ],
    );
    assert_eq!(recipe(&paper, "/name"), "cifar-paper");
    assert_eq!(column(&paper.rows, 2), ["0.01"]);

    // Data: batch size and held-out images change the epochs; --epochs the iteration count.
    let big_batch = run("flag-batch-size", &["--batch-size", "16"]);
    assert_eq!(recipe(&big_batch, "/batch_size"), 16);
    assert_eq!(
        column(&big_batch.rows, 1),
        ["0", "0", "1", "1"],
        "2 batches of 16 per epoch"
    );
    let held_out = run("flag-holdout", &["--holdout", "16"]);
    assert!(
        held_out.stderr.contains("held out 16 training images"),
        "{}",
        held_out.stderr
    );
    assert_eq!(
        column(&held_out.rows, 1),
        ["0", "0", "0", "1"],
        "3 batches of 8 per epoch"
    );
    let epochs = run("flag-epochs", &["--epochs", "2"]);
    assert_eq!(
        epochs.rows.last().unwrap()[0],
        "10",
        "2 epochs of 5 batches"
    );
    assert!(
        base.stderr.contains(" kernels (RESNET_CPU_ISA)"),
        "{}",
        base.stderr
    );
    // Recomputation changes what backward keeps, never a result: the same losses and the same final weights.
    let recomputed = run("flag-recompute", &["--recompute"]);
    assert!(
        recomputed
            .stderr
            .contains("activations recomputed in backward, 2 segments of 3 residual units"),
        "{}",
        recomputed.stderr
    );
    assert_eq!(column(&recomputed.rows, 3), column(&base.rows, 3));
    let tensors = |r: &Run| {
        let t =
            candle_core::safetensors::load(r.dir.join("last.safetensors"), &Device::Cpu).unwrap();
        let mut named: Vec<(String, Vec<f32>)> = t
            .into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    };
    assert_eq!(
        tensors(&recomputed),
        tensors(&base),
        "weights, BN statistics, momenta"
    );
    let threads = run("flag-threads", &["--threads", "3"]);
    assert!(
        threads.stderr.contains("3 decode threads"),
        "{}",
        threads.stderr
    );

    // Logging, evaluation and checkpoints.
    let sparse = run("flag-log-every", &["--log-every", "2"]);
    assert_eq!(column(&sparse.rows, 0), ["2", "4"]);
    assert_eq!(
        column(&base.rows, 5)[..3],
        ["", "", ""],
        "evaluation at the end only"
    );
    let evaluated = run("flag-eval-every", &["--eval-every", "2"]);
    let test_errors = column(&evaluated.rows, 5);
    assert!(
        test_errors[1].parse::<f64>().is_ok() && test_errors[0].is_empty(),
        "{test_errors:?}"
    );
    let checkpoints = run(
        "flag-checkpoints",
        &["--checkpoint-every", "1", "--keep", "2"],
    );
    let mut files: Vec<String> = std::fs::read_dir(&checkpoints.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("ckpt-"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["ckpt-000000003.safetensors", "ckpt-000000004.safetensors"]
    );
    assert_eq!(checkpoints.config["checkpoint_every"], 1);
    assert_eq!(checkpoints.config["keep"], 2);
}

/// `--strict` stops at an unreadable training image; without it the image is skipped and counted.
#[test]
fn strict_stops_at_an_unreadable_image() {
    let data = small_cifar("train-strict", 2);
    let broken = data.join("train/cat/broken.jpg");
    std::fs::write(&broken, b"not a jpeg").unwrap();
    let args = [
        QUICK,
        &[
            "--batch-size",
            "7",
            "--iterations",
            "3",
            "--eval-every",
            "0",
        ],
    ]
    .concat();
    let lenient = run_with("strict-off", &data, &args);
    assert!(
        lenient
            .stderr
            .contains("1 unreadable image(s) were skipped"),
        "{}",
        lenient.stderr
    );
    let out = temp_dir("strict-on");
    let res = train_cmd()
        .args(&args)
        .arg("--strict")
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.lines().last().unwrap().starts_with("error:") && stderr.contains("broken.jpg"),
        "{stderr}"
    );
}

/// A resumed run keeps its recipe: flags that would change it are refused, never silently dropped; --epochs
/// extends it like --iterations.
#[test]
fn resume_refuses_recipe_flags_and_extends_by_epochs() {
    let data = small_cifar("train-resume-flags", 2); // 20 training images
    let args = [
        QUICK,
        &[
            "--batch-size",
            "5",
            "--iterations",
            "2",
            "--eval-every",
            "0",
        ],
    ]
    .concat();
    let first = run_with("resume-flags", &data, &args);
    let dir = first.dir.to_str().unwrap();
    for (flag, value) in [
        ("--lr", Some("0.5")),
        ("--seed", Some("9")),
        ("--model", Some("resnet32")),
        ("--nesterov", None),
    ] {
        let mut a = vec!["--resume", dir, flag];
        a.extend(value);
        assert_one_line_error(&train(&a), &format!("{flag} cannot change a resumed run"));
    }
    assert_one_line_error(&train(&["--resume", dir, "--out", dir]), "--out");
    ok(&train(&["--resume", dir, "--epochs", "2"]));
    assert_eq!(
        losses(&first.dir).last().unwrap().0,
        8,
        "2 epochs of 4 batches"
    );
}

#[test]
fn identity_mappings_experiment_trains_the_chosen_variants_with_one_budget() {
    let data = small_cifar("train-identity-mappings", 4);
    let out = temp_dir("run-identity-mappings");
    let table = run_experiment(
        &[
            "identity-mappings",
            "--depth",
            "8",
            "--variants",
            "original,dropout_shortcut,relu_preact,preact_1layer",
            "--budget",
            "3",
            "--recipe",
            "quick",
            "--batch-size",
            "8",
        ],
        &data,
        &out,
    );
    for (key, model, figure) in [
        ("original", "resnet8", "Fig. 2(a), 4(a)"),
        ("dropout_shortcut", "resnet8_dropout_shortcut", "Fig. 2(f)"),
        ("relu_preact", "resnet8_relu_preact", "Fig. 4(d)"),
        ("preact_1layer", "preact_resnet8_1layer", "Table 3"),
    ] {
        // variant, paper, model, parameters, iterations, loss, training error, test error, paper's error
        let cells = table_row(&table, key);
        assert_eq!(
            (cells[1].as_str(), cells[2].as_str(), cells[4].as_str()),
            (figure, model, "3"),
            "{cells:?}"
        );
        assert!(cells[3].parse::<usize>().unwrap() > 70_000, "{cells:?}");
        assert!(cells[5].parse::<f64>().unwrap().is_finite(), "{cells:?}");
        assert!(cells[7].parse::<f64>().is_ok(), "{cells:?}");
        assert!(out.join(model).join("metrics.csv").exists());
    }
    assert_eq!(table.lines().count(), 2 + 4, "{table}");

    let d = data.to_str().unwrap();
    let experiment = |extra: &[&str]| {
        let mut args = vec!["experiment", "identity-mappings", "--data", d];
        args.extend(extra);
        train(&args)
    };
    assert_one_line_error(&experiment(&["--variants", "halfway"]), "halfway");
    assert_one_line_error(&experiment(&["--budget", "5x"]), "--budget");
    assert_one_line_error(&experiment(&["--depth", "21"]), "resnet21");
    assert_one_line_error(
        &experiment(&["--budget", "3", "--iterations", "3"]),
        "--budget",
    );
    assert_one_line_error(
        &train(&["experiment", "degradation", "--depth", "20", "--data", d]),
        "--depth",
    );
}

#[test]
fn gate_bias_reaches_the_gates_and_is_refused_without_one() {
    let data = small_cifar("train-gate-bias", 2);
    let d = data.to_str().unwrap();
    let out = temp_dir("run-gate-bias");
    let res = train(&[
        "--model",
        "resnet8_shortcut_gating",
        "--gate-bias",
        "-2.5",
        "--recipe",
        "quick",
        "--batch-size",
        "4",
        "--iterations",
        "1",
        "--lr",
        "1e-9",
        "--data",
        d,
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&res);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["recipe"]["gate_bias"], -2.5);
    // After one step at lr 1e-9, the saved gates still start from −2.5.
    let weights =
        candle_core::safetensors::load(out.join("last.safetensors"), &Device::Cpu).unwrap();
    let bias: Vec<f32> = weights["layer1.0.gate.bias"].to_vec1().unwrap();
    assert!(bias.iter().all(|b| (b + 2.5).abs() < 1e-6), "{bias:?}");
    assert_one_line_error(
        &train(&["--model", "resnet8", "--gate-bias", "-6", "--data", d]),
        "--gate-bias",
    );
}
