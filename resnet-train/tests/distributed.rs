//! Data-parallel training under Open MPI's `mpirun`, as a user runs it: two ranks train what one process
//! accumulating two micro-batches trains, a killed rank stops the job with its checkpoint intact and the run
//! resumes, and bad set-ups are one-line errors. Needs the `mpi` feature (the README's test command builds
//! it) and `mpirun` (`.ci/run` installs Open MPI when it is missing).
#![cfg(feature = "mpi")]

use candle_core::Device;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tests::temp_dir;

const BIN: &str = env!("CARGO_BIN_EXE_resnet-train");

/// ResNet-20, the quick recipe, a log row and a replica check every step.
const QUICK: &[&str] = &[
    "--recipe",
    "quick",
    "--log-every",
    "1",
    "--seed",
    "5",
    "--eval-every",
    "0",
];

/// `mpirun -np N` (as root too: CI runs as root), one core per rank, the ranks' output on our pipes.
fn mpirun(ranks: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .args(["-np", &ranks.to_string(), BIN, "--distributed"])
    // Containers forbid the cross-process memory attach of Open MPI's shared-memory transport.
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    cmd
}

fn run(mut cmd: Command, args: &[&str]) -> Output {
    cmd.args(args)
        .output()
        .expect("starting mpirun or resnet-train")
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "the run failed:\n{stderr}");
    stderr
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The train_loss column of a run's metrics.csv, as numbers.
fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(3).unwrap().parse().unwrap())
        .collect()
}

/// The trainable parameters of a checkpoint (BatchNorm running statistics and momentum left out).
fn parameters(checkpoint: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(checkpoint, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(name, _)| {
            !name.starts_with("optimizer.")
                && !name.contains("running_")
                && !name.contains("num_batches_tracked")
        })
        .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// Largest |a − b| / (|b| + 1e-3) over every parameter of two checkpoints.
fn largest_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (parameters(a), parameters(b));
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect(),
        "the checkpoints hold different tensors"
    );
    let mut worst = 0f64;
    for (name, x) in &a {
        for (u, v) in x.iter().zip(&b[name]) {
            worst = worst.max((u - v).abs() as f64 / (v.abs() as f64 + 1e-3));
        }
    }
    worst
}

#[test]
fn two_ranks_of_64_train_what_one_process_accumulating_two_micro_batches_of_64_trains() {
    let data = tests::small_cifar("dist-equal", 70, 5);
    let (one, two) = (temp_dir("dist-one"), temp_dir("dist-two"));
    let common: Vec<&str> = QUICK
        .iter()
        .copied()
        .chain(["--batch-size", "64", "--data", path(&data)])
        .collect();

    let mut single = Command::new(BIN);
    single.args(&common).args(["--iterations", "5"]);
    let solo = ok(&run(single, &["--accumulate", "2", "--out", path(&one)]));
    assert!(
        solo.contains("global batch 128 = 2 micro-batches × 64"),
        "{solo}"
    );
    let mut ranks = mpirun(2);
    ranks.args(&common).args(["--iterations", "5"]);
    let stderr = ok(&run(ranks, &["--out", path(&two)]));
    println!("{stderr}");
    assert!(
        stderr.contains("global batch 128 = 2 ranks × 1 micro-batch(es) × 64"),
        "{stderr}"
    );
    // Each rank's parameters are fingerprinted after every step (--log-every 1) and compared; a difference
    // would have stopped the run.
    assert!(
        stderr.contains("(5 steps; replicas bit-identical at every log step)"),
        "{stderr}"
    );

    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 5);
    assert_eq!(b.len(), 5);
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "step {}: loss {x} in one process, {y} on two ranks",
            step + 1
        );
    }
    // Against the plain one-batch step, not against itself: a run of batches of 64 with a learning rate too
    // small to move an f32 weight sees the step's two micro-batches as its steps 1 and 2 at the initial weights,
    // and the accumulated step's loss is their mean.
    let plain = temp_dir("dist-plain");
    let mut frozen = Command::new(BIN);
    frozen
        .args(&common)
        .args(["--lr", "1e-30", "--iterations", "2"]);
    ok(&run(frozen, &["--out", path(&plain)]));
    let halves = losses(&plain);
    let mean = (halves[0] + halves[1]) / 2.0;
    assert!(
        (a[0] - mean).abs() <= 2e-6 * mean,
        "accumulated step 1: loss {} but its micro-batches' losses are {halves:?} (mean {mean})",
        a[0]
    );
    let worst = largest_difference(&one.join("last.safetensors"), &two.join("last.safetensors"));
    println!("losses {a:?} / {b:?}; largest relative parameter difference {worst:e}");
    assert!(worst <= 1e-5, "parameters differ by {worst:e}");
}

/// The PID of rank `rank` among the children of `mpirun` (Open MPI puts the rank in each one's environment).
fn rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The parent PID is the 2nd field after the parenthesised command name.
        let ppid: u32 = stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let has_rank = environ.split(|&b| b == 0).any(|v| v == want.as_bytes());
        (ppid == mpirun && has_rank).then_some(pid)
    })
}

#[test]
fn a_rank_killed_mid_run_stops_the_job_and_the_run_resumes_from_its_last_checkpoint() {
    let data = tests::small_cifar("dist-kill", 30, 5);
    let out = temp_dir("dist-kill-out");
    let common: Vec<&str> = QUICK
        .iter()
        .copied()
        .chain(["--batch-size", "32", "--data", path(&data)])
        .collect();

    let mut cmd = mpirun(2);
    cmd.args(&common)
        .args([
            "--iterations",
            "2000",
            "--checkpoint-every",
            "4",
            "--out",
            path(&out),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut job = cmd.spawn().expect("starting mpirun");
    let rows = || {
        std::fs::read_to_string(out.join("metrics.csv"))
            .map_or(0, |t| t.lines().count().saturating_sub(1))
    };
    let started = Instant::now();
    while rows() < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the job made no progress"
        );
        assert!(job.try_wait().unwrap().is_none(), "the job ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim = rank_pid(job.id(), 1).expect("rank 1 among mpirun's children");
    let killed = Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let at_kill = Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().unwrap() {
            break status;
        }
        assert!(
            at_kill.elapsed() < Duration::from_secs(60),
            "the job still runs 60 s after the kill"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!(
        "stopped {:.1} s after the kill: {status}\n{stdout}{stderr}",
        at_kill.elapsed().as_secs_f64()
    );
    assert!(!status.success(), "mpirun exited 0 after a rank was killed");
    let said = format!("{stdout}{stderr}");
    assert!(
        said.contains("rank 1") && said.contains("signal 9"),
        "no message names the killed rank and its signal:\n{said}"
    );

    // The last checkpoint is whole: it loads, and names an iteration at a multiple of --checkpoint-every.
    let last = out.join("last.safetensors");
    let meta = resnet_core::weights::read_metadata(&last).expect("last.safetensors reads");
    let state: serde_json::Value = serde_json::from_str(&meta["training_state"]).unwrap();
    let iteration = state["iteration"].as_u64().unwrap();
    assert!(
        iteration >= 8 && iteration.is_multiple_of(4),
        "checkpoint at iteration {iteration}"
    );

    // Resumed under mpirun with the same world size, it continues to its new end.
    let target = (iteration + 3).to_string();
    let resumed = ok(&run(
        mpirun(2),
        &["--resume", path(&out), "--iterations", &target],
    ));
    assert!(
        resumed.contains(&format!("resumed from {}", last.display())),
        "{resumed}"
    );
    let rows = losses(&out);
    assert_eq!(
        rows.len() as u64,
        iteration + 3,
        "metrics.csv rows after the resume"
    );
}

/// An uninterrupted two-rank run and one stopped and resumed at a checkpoint end with the same parameters,
/// bit for bit; resuming it in one process with --accumulate 2 keeps the global batch too.
#[test]
fn a_resumed_two_rank_run_continues_exactly() {
    let data = tests::small_cifar("dist-resume", 30, 5);
    let (straight, split, solo) = (
        temp_dir("dist-straight"),
        temp_dir("dist-split"),
        temp_dir("dist-solo"),
    );
    let common: Vec<&str> = QUICK
        .iter()
        .copied()
        .chain([
            "--batch-size",
            "32",
            "--checkpoint-every",
            "3",
            "--data",
            path(&data),
        ])
        .collect();
    let mut cmd = mpirun(2);
    cmd.args(&common);
    ok(&run(cmd, &["--iterations", "6", "--out", path(&straight)]));
    let mut cmd = mpirun(2);
    cmd.args(&common);
    ok(&run(cmd, &["--iterations", "3", "--out", path(&split)]));
    for f in ["config.json", "metrics.csv", "last.safetensors"] {
        std::fs::copy(split.join(f), solo.join(f)).unwrap();
    }
    ok(&run(
        mpirun(2),
        &["--resume", path(&split), "--iterations", "6"],
    ));
    let a = straight.join("last.safetensors");
    assert_eq!(largest_difference(&a, &split.join("last.safetensors")), 0.0);
    assert_eq!(losses(&straight), losses(&split));

    let mut one = Command::new(BIN);
    one.args(["--resume", path(&solo), "--iterations", "6"]);
    let said = ok(&one.output().unwrap());
    assert!(
        said.contains("global batch 64 = 2 micro-batches × 32"),
        "{said}"
    );
    let worst = largest_difference(&a, &solo.join("last.safetensors"));
    assert!(
        worst <= 1e-5,
        "one process resuming a 2-rank run: parameters differ by {worst:e}"
    );
}

fn one_line_error_from_each_rank(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the job should have failed:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert!(!errors.is_empty(), "no error line:\n{stderr}");
    for line in errors {
        assert!(line.contains(needle), "expected `{needle}` in:\n{stderr}");
    }
}

#[test]
fn ranks_started_with_different_flags_refuse_to_train() {
    let data = tests::small_cifar("dist-disagree", 20, 5);
    let out = temp_dir("dist-disagree-out");
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe"])
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    for (i, seed) in ["1", "2"].iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-np", "1", BIN, "--distributed", "--recipe", "quick"])
            .args(["--batch-size", "16", "--iterations", "2", "--seed", seed])
            .args(["--data", path(&data), "--out", path(&out)]);
    }
    one_line_error_from_each_rank(
        &cmd.output().unwrap(),
        "rank 1 of 2 disagrees with rank 0 on the training state (recipe, seed, iteration): start every rank with the same flags",
    );
}

#[test]
fn a_world_too_large_for_the_data_is_refused() {
    let data = tests::small_cifar("dist-small", 5, 5);
    let out = temp_dir("dist-small-out");
    let args = [
        "--recipe",
        "quick",
        "--batch-size",
        "32",
        "--iterations",
        "2",
    ];
    let output = run(
        mpirun(2),
        &[&args[..], &["--data", path(&data), "--out", path(&out)]].concat(),
    );
    one_line_error_from_each_rank(
        &output,
        "a step takes 64 images (--batch-size 32 × 2 rank(s) × --accumulate 1) but the training split has 50",
    );
}
