//! `resnet-train`: train any registered ResNet with the papers' recipes. With no flags: the paper's CIFAR-10
//! ResNet-20 (`--recipe cifar-paper --model resnet20`).

mod checkpoint;
mod curves;
mod metrics_log;
mod recipe;
mod schedule;
mod trainer;

use anyhow::{bail, Context, Result};
use clap::Parser;
use recipe::{Recipe, Schedule};
use resnet_core::parse_device;
use std::path::PathBuf;
use trainer::{RunOptions, Trainer};

/// Large tensors are allocated and freed every layer: a caching allocator avoids re-faulting their pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "resnet-train",
    version,
    about = "Train ResNets with the procedures of He et al. (2016)"
)]
#[command(args_conflicts_with_subcommands = true)]
#[command(
    after_help = "Examples:\n  resnet-train                      (ResNet-20, paper recipe, CIFAR-10 from the hub)\n  resnet-train --data cifar10/ --out runs/resnet20\n  resnet-train --model resnet110 --data cifar10/ --out runs/r110\n  resnet-train --resume runs/resnet20\n  resnet-train compare runs/plain20 runs/plain56 --out plain.png\n  resnet-train experiment degradation --data cifar10/ --iterations 2000 --out runs/degradation"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Draw several runs on one figure (training error thin, test error bold).
    Compare {
        /// Run folders (each with a metrics.csv).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run one of the papers' comparisons and write its table and figure: `degradation` (Fig. 1/4: plain-20,
    /// plain-56, ResNet-20, ResNet-56) or `preact` (Identity Mappings Table 1: ResNet-110 vs pre-activation).
    Experiment {
        #[arg(value_parser = ["degradation", "preact"])]
        name: String,
        #[command(flatten)]
        train: Box<TrainArgs>,
    },
}

#[derive(clap::Args, Clone)]
struct TrainArgs {
    /// Registered network (resnet20 … resnet1202, plain20 …, preact_resnet164, resnet50, resnetv2_50, …).
    #[arg(long, default_value = "resnet20")]
    model: String,
    /// Dataset folder (CIFAR-10/100 binaries, or an ImageFolder with train/ and val/ or test/), or
    /// hub:OWNER/REPO[@REV][:CONFIG] for CIFAR parquet files on the Hugging Face hub [default: hub:uoft-cs/cifar10].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder: config.json, metrics.csv, checkpoints.
    #[arg(long)]
    out: Option<PathBuf>,
    /// cifar-paper, preact-cifar, imagenet-paper or quick.
    #[arg(long, default_value = "cifar-paper")]
    recipe: String,
    /// Stop after this many iterations (overrides the recipe).
    #[arg(long, conflicts_with = "epochs")]
    iterations: Option<u64>,
    /// Stop after this many epochs (converted to iterations).
    #[arg(long)]
    epochs: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    momentum: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    nesterov: bool,
    /// No weight decay on BN parameters and biases.
    #[arg(long)]
    no_decay_norm_bias: bool,
    /// Learning-rate milestones (iterations), e.g. 32000,48000.
    #[arg(long, value_delimiter = ',')]
    milestones: Option<Vec<u64>>,
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// After training, recompute BN statistics over N training batches instead of the moving average.
    #[arg(long)]
    bn_recalibrate: Option<usize>,
    /// Start each residual branch at zero (last BN γ = 0).
    #[arg(long)]
    zero_init_residual: bool,
    /// Training images held out for validation (the paper: 5000), 0 for none.
    #[arg(long)]
    holdout: Option<usize>,
    #[arg(long)]
    eval_every: Option<u64>,
    #[arg(long)]
    log_every: Option<u64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every N iterations and at the end (default 1000; a resumed run keeps its own).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Numbered checkpoints to keep (default 3; a resumed run keeps its own).
    #[arg(long)]
    keep: Option<usize>,
    /// Continue the run in this folder from its newest readable checkpoint.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Decode threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Fail on the first unreadable image instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() {
    resnet_infer::keep_freed_memory();
    resnet_core::threads::use_one_compute_pool();
    let cli: Cli = resnet_infer::parse_args();
    let result = match cli.command {
        None => train(&cli.train).map(|_| ()),
        Some(Command::Compare { runs, out }) => compare(&runs, &out),
        Some(Command::Experiment { name, train }) => experiment(&name, &train),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn positive(name: &str, v: Option<f64>) -> Result<()> {
    match v {
        Some(v) if !(v > 0.0 && v.is_finite()) => {
            bail!("--{name} must be a positive number, got {v}")
        }
        _ => Ok(()),
    }
}

/// The named recipe with every flag applied.
fn resolve_recipe(cli: &TrainArgs) -> Result<Recipe> {
    let config = resnet_core::config_for(&cli.model)?;
    let mut r = Recipe::named(&cli.recipe, &cli.model, config.depth()).with_context(|| {
        format!(
            "unknown recipe `{}`: expected one of {}",
            cli.recipe,
            recipe::NAMES.join(", ")
        )
    })?;
    positive("lr", cli.lr)?;
    if cli.batch_size == Some(0) {
        bail!("--batch-size must be at least 1");
    }
    let ranges = [
        ("momentum", cli.momentum, 1.0),
        ("label-smoothing", cli.label_smoothing, 1.0),
        ("weight-decay", cli.weight_decay, f64::INFINITY),
    ];
    for (name, value, end) in ranges {
        if let Some(v) = value.filter(|v| !(0.0..end).contains(v)) {
            bail!("--{name} must be in [0, {end}), got {v}");
        }
    }
    r.batch_size = cli.batch_size.unwrap_or(r.batch_size);
    r.sgd.lr = cli.lr.unwrap_or(r.sgd.lr);
    r.sgd.momentum = cli.momentum.unwrap_or(r.sgd.momentum);
    r.sgd.weight_decay = cli.weight_decay.unwrap_or(r.sgd.weight_decay);
    r.sgd.nesterov |= cli.nesterov;
    r.sgd.decay_norm_and_bias &= !cli.no_decay_norm_bias;
    if let Some(m) = &cli.milestones {
        r.schedule = Schedule::Step {
            milestones: m.clone(),
            factor: 0.1,
        };
    }
    r.label_smoothing = cli.label_smoothing.unwrap_or(r.label_smoothing);
    r.zero_init_residual |= cli.zero_init_residual;
    r.bn_recalibration_batches = cli.bn_recalibrate.unwrap_or(r.bn_recalibration_batches);
    r.validation_holdout = cli.holdout.unwrap_or(r.validation_holdout);
    r.eval_every = cli.eval_every.unwrap_or(r.eval_every);
    r.log_every = cli.log_every.unwrap_or(r.log_every);
    if cli.iterations == Some(0) || cli.epochs == Some(0) {
        bail!("--iterations / --epochs must be at least 1");
    }
    if let Some(n) = cli.iterations {
        r.iterations = n;
    }
    Ok(r)
}

/// Trains one network; returns its run folder.
fn train(cli: &TrainArgs) -> Result<PathBuf> {
    let mut recipe = resolve_recipe(cli)?;
    let device = parse_device(&cli.device)?;
    let (out, resume) = match (&cli.resume, &cli.out) {
        (Some(dir), _) => (dir.clone(), true),
        (None, Some(out)) => (out.clone(), false),
        (None, None) => (PathBuf::from("runs").join(&recipe.model), false),
    };
    let saved = if resume {
        Some(saved_config(&out)?)
    } else {
        None
    };
    let saved_value = |key: &str| saved.as_ref().and_then(|c| c[key].as_u64());
    let data = match &cli.data {
        Some(d) => d.clone(),
        None if resume => saved
            .as_ref()
            .and_then(|c| c["data"].as_str())
            .map(PathBuf::from)
            .with_context(|| {
                format!(
                    "{} has no data folder: pass --data",
                    out.join("config.json").display()
                )
            })?,
        None => {
            eprintln!(
                "no --data given: CIFAR-10 from the Hugging Face hub ({}), cached by hf-hub",
                datasets::DEFAULT_HUB_DATA
            );
            PathBuf::from(datasets::DEFAULT_HUB_DATA)
        }
    };
    if let Some(epochs) = cli.epochs {
        let source = datasets::DataSource::open(&data)?;
        let train = source
            .train
            .as_ref()
            .or(source.test.as_ref())
            .map_or(0, |s| s.len());
        let per_epoch =
            (train.saturating_sub(recipe.validation_holdout) / recipe.batch_size).max(1) as u64;
        recipe.iterations = epochs * per_epoch;
    }
    let options = RunOptions {
        data,
        out: out.clone(),
        seed: cli.seed,
        checkpoint_every: cli
            .checkpoint_every
            .or(saved_value("checkpoint_every"))
            .unwrap_or(1000),
        keep: cli
            .keep
            .or(saved_value("keep").map(|k| k as usize))
            .unwrap_or(3)
            .max(1),
        threads: cli.threads,
        strict: cli.strict,
        device,
    };
    let mut trainer = Trainer::new(recipe, options, resume, cli.iterations)?;
    if !resume {
        eprintln!(
            "recipe:\n{}",
            serde_json::to_string_pretty(trainer.recipe())?
        );
    }
    let error = trainer.run()?;
    match error {
        Some(e) => println!("finished: test error {e:.2} %; run in {}", out.display()),
        None => println!("finished; run in {}", out.display()),
    }
    Ok(out)
}

/// The label of a run folder: its model name from config.json, else the folder name.
fn run_label(dir: &std::path::Path) -> String {
    saved_config(dir)
        .ok()
        .and_then(|c| c["recipe"]["model"].as_str().map(String::from))
        .unwrap_or_else(|| {
            dir.file_name()
                .map_or("run".into(), |n| n.to_string_lossy().into_owned())
        })
}

fn compare(runs: &[PathBuf], out: &std::path::Path) -> Result<()> {
    let rows: Vec<(String, Vec<metrics_log::Row>)> = runs
        .iter()
        .map(|r| {
            Ok((
                run_label(r),
                metrics_log::read_rows(&r.join("metrics.csv"))?,
            ))
        })
        .collect::<Result<_>>()?;
    let curves: Vec<curves::Curve> = rows
        .iter()
        .map(|(label, rows)| curves::Curve { label, rows })
        .collect();
    curves::draw(&curves, "training error (thin), test error (bold)", out)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn experiment(name: &str, args: &TrainArgs) -> Result<()> {
    let models: &[&str] = match name {
        "degradation" => &["plain20", "plain56", "resnet20", "resnet56"],
        _ => &["resnet110", "preact_resnet110"],
    };
    let base = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(name));
    let mut table = String::from("| model | iterations | final training error (%) | final test error (%) | best test error (%) |\n|---|---|---|---|---|\n");
    let mut dirs = Vec::new();
    for model in models {
        let mut run = args.clone();
        run.model = model.to_string();
        run.out = Some(base.join(model));
        if model.starts_with("preact") && args.recipe == "cifar-paper" {
            run.recipe = "preact-cifar".into();
        }
        let dir = train(&run)?;
        let rows = metrics_log::read_rows(&dir.join("metrics.csv"))?;
        let last = rows.last().context("the run logged nothing")?;
        let best = rows
            .iter()
            .filter_map(|r| r.test_top1_error)
            .fold(f64::INFINITY, f64::min);
        let cell = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
        table.push_str(&format!(
            "| {model} | {} | {} | {} | {} |\n",
            last.iteration,
            cell(last.train_error),
            cell(last.test_top1_error),
            cell(best.is_finite().then_some(best))
        ));
        dirs.push(dir);
    }
    std::fs::write(base.join("table.md"), &table)?;
    compare(&dirs, &base.join("figure.png"))?;
    println!("{table}");
    Ok(())
}

/// The `config.json` a run was started with.
fn saved_config(out: &std::path::Path) -> Result<serde_json::Value> {
    let path = out.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot resume from {}: reading {}",
            out.display(),
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}
