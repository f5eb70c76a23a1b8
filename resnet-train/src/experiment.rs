//! `resnet-train experiment NAME`: the papers' comparisons as one command each. Every net of an experiment is
//! trained with the same recipe and budget; the experiment writes `table.md` (final training loss and error,
//! test error, the paper's number where there is one) and `figure.png` (the curves of all its nets).

use crate::{compare, metrics_log, train, TrainArgs};
use anyhow::{bail, Context, Result};
use resnet_core::ablations::{Ablation, ABLATIONS};
use resnet_core::optim::Sgd;
use resnet_core::{parse_device, train_step, Model, StepOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const NAMES: &[&str] = &["degradation", "preact", "identity-mappings"];

/// How long each net trains: a fixed number of iterations, or a wall-clock time for the whole experiment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Iterations(u64),
    Time(Duration),
}

impl std::str::FromStr for Budget {
    type Err = String;

    /// `2000` (iterations per net), `90s`, `45m`, `2h`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!("expected iterations per net (2000) or a time for the whole experiment (90s, 45m, 2h), got `{s}`")
        };
        let (number, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
            Some(i) => s.split_at(i),
            None => {
                return s
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .map(Budget::Iterations)
                    .ok_or_else(bad)
            }
        };
        let value: f64 = number.parse().map_err(|_| bad())?;
        let seconds = match unit {
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return Err(bad()),
        };
        match seconds > 0.0 && seconds.is_finite() {
            true => Ok(Budget::Time(Duration::from_secs_f64(seconds))),
            false => Err(bad()),
        }
    }
}

/// What `experiment` was asked for, beside the training flags.
pub struct ExperimentArgs<'a> {
    pub name: &'a str,
    pub variants: Option<&'a [String]>,
    pub depth: Option<usize>,
    pub budget: Option<Budget>,
    pub train: &'a TrainArgs,
}

/// One net of an experiment and the paper's figure and number beside it.
struct Entry {
    model: String,
    /// The ablation's key, figure and reported error (identity-mappings).
    ablation: Option<(&'static str, &'static str, String)>,
}

fn entries(args: &ExperimentArgs) -> Result<Vec<Entry>> {
    let plain = |models: &[&str]| {
        models
            .iter()
            .map(|m| Entry {
                model: m.to_string(),
                ablation: None,
            })
            .collect()
    };
    if args.name != "identity-mappings" {
        if args.variants.is_some() || args.depth.is_some() {
            bail!("--variants and --depth choose the nets of `experiment identity-mappings` only");
        }
        return Ok(match args.name {
            "degradation" => plain(&["plain20", "plain56", "resnet20", "resnet56"]),
            _ => plain(&["resnet110", "preact_resnet110"]),
        });
    }
    let depth = args.depth.unwrap_or(110);
    let keys: Vec<&str> = match args.variants {
        Some(v) => v.iter().map(String::as_str).collect(),
        None => ABLATIONS.iter().map(|a| a.key).collect(),
    };
    keys.iter()
        .map(|&key| {
            let ablation = Ablation::by_key(key).with_context(|| {
                let known: Vec<&str> = ABLATIONS.iter().map(|a| a.key).collect();
                format!("--variants: unknown variant `{key}`: expected some of {}", known.join(", "))
            })?;
            let model = ablation.model_name(depth);
            resnet_core::config_for(&model).with_context(|| {
                format!("--variants {key} --depth {depth}: {model} is not a CIFAR net (depths 6n+2, or 9n+2 for bottlenecks; 1layer: 3n+2)")
            })?;
            Ok(Entry {
                model,
                ablation: Some((ablation.key, ablation.figure, ablation.reported(depth).to_string())),
            })
        })
        .collect()
}

/// Iterations per net that fit `total` for `nets` nets: one training step of `model` is timed (after two
/// untimed ones) on random images at the recipe's batch size, and each evaluation of the test split is
/// counted as a third of a step per image.
fn iterations_within(total: Duration, nets: usize, model: &str, run: &TrainArgs) -> Result<u64> {
    let job: crate::TrainJob = run.try_into()?;
    let recipe = &job.recipe;
    let device = parse_device(&run.device)?;
    let net = Model::by_name(model, 0, &device)?;
    let batch = recipe.batch_size;
    let images = candle_core::Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &device)?;
    let labels = candle_core::Tensor::zeros(batch, candle_core::DType::U32, &device)?;
    let mut sgd = Sgd::new(net.trainable_vars(), recipe.sgd);
    let options = StepOptions {
        label_smoothing: recipe.label_smoothing,
        recompute: run.recompute,
    };
    let mut step = Duration::ZERO;
    for i in 0..3 {
        let t = Instant::now();
        train_step(&net, &mut sgd, &images, &labels, &options)?;
        if i == 2 {
            step = t.elapsed();
        }
    }
    let test_images = datasets::DataSource::open(&job.options.data)?
        .test
        .map_or(0, |t| t.len());
    let evaluation = step.as_secs_f64() * test_images as f64 / batch as f64 / 3.0;
    let per_net = total.as_secs_f64() / nets as f64;
    // per_net = it·step + (it / eval_every + 1)·evaluation
    let every = recipe.eval_every.max(1) as f64;
    let it = (per_net - evaluation) / (step.as_secs_f64() + evaluation / every);
    eprintln!(
        "budget {:.0} s for {nets} nets: {:.3} s per training step of {model} (batch {batch}), {evaluation:.0} s per evaluation of {test_images} test images",
        total.as_secs_f64(),
        step.as_secs_f64()
    );
    if it < 1.0 {
        bail!("--budget {:.0}s is too short for {nets} nets of {:.1} s per step and {evaluation:.0} s per evaluation", total.as_secs_f64(), step.as_secs_f64());
    }
    Ok(it as u64)
}

pub fn run(args: &ExperimentArgs) -> Result<()> {
    let name = args.name;
    let run = args.train;
    if run.resume.is_some() || run.model.is_some() {
        bail!("experiment {name} starts fresh runs of its own networks: --resume and --model do not apply");
    }
    if run.distributed {
        bail!("experiment {name} trains its nets one after another in one process: --distributed applies to a single training run");
    }
    if args.budget.is_some() && (run.iterations.is_some() || run.epochs.is_some()) {
        bail!(
            "--budget sets the iterations of every net: give it or --iterations/--epochs, not both"
        );
    }
    let nets = entries(args)?;
    let base = run
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(name));
    let iterations = match args.budget {
        Some(Budget::Iterations(n)) => Some(n),
        Some(Budget::Time(total)) => {
            let mut probe = run.clone();
            probe.model = Some(nets[0].model.clone());
            let n = iterations_within(total, nets.len(), &nets[0].model, &probe)?;
            eprintln!("budget: {n} iterations per net");
            Some(n)
        }
        None => run.iterations,
    };
    let mut table = match name == "identity-mappings" {
        true => format!("| variant | paper | model | parameters | iterations | final training loss | final training error (%) | test error (%) | paper's test error, ResNet-{} (%) |\n|---|---|---|---|---|---|---|---|---|\n", args.depth.unwrap_or(110)),
        false => "| model | iterations | final training error (%) | final test error (%) | best test error (%) |\n|---|---|---|---|---|\n".to_string(),
    };
    let mut dirs = Vec::new();
    for entry in &nets {
        let model = &entry.model;
        let mut one = run.clone();
        one.model = Some(model.clone());
        one.out = Some(base.join(model));
        one.iterations = iterations;
        if model.starts_with("preact")
            && one.recipe.as_deref().unwrap_or("cifar-paper") == "cifar-paper"
        {
            one.recipe = Some("preact-cifar".into());
        }
        let dir = train(&one, std::rc::Rc::new(crate::distributed::Alone))?;
        let rows = metrics_log::read_rows(&dir.join("metrics.csv"))?;
        let last = rows.last().context("the run logged nothing")?;
        let cell = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
        let last_loss = rows.iter().rev().find_map(|r| r.train_loss);
        let last_train_error = rows.iter().rev().find_map(|r| r.train_error);
        let last_test = rows.iter().rev().find_map(|r| r.test_top1_error);
        if let Some((key, figure, reported)) = &entry.ablation {
            let params = Model::by_name(model, 0, &candle_core::Device::Cpu)?.parameter_count();
            table.push_str(&format!(
                "| {key} | {figure} | {model} | {params} | {} | {} | {} | {} | {reported} |\n",
                last.iteration,
                last_loss.map_or("–".into(), |v| format!("{v:.4}")),
                cell(last_train_error),
                cell(last_test),
            ));
        } else {
            let best = rows
                .iter()
                .filter_map(|r| r.test_top1_error)
                .fold(f64::INFINITY, f64::min);
            table.push_str(&format!(
                "| {model} | {} | {} | {} | {} |\n",
                last.iteration,
                cell(last.train_error),
                cell(last.test_top1_error),
                cell(best.is_finite().then_some(best))
            ));
        }
        dirs.push(dir);
    }
    std::fs::write(base.join("table.md"), &table)?;
    compare(&dirs, &base.join("figure.png"))?;
    println!("{table}");
    Ok(())
}
