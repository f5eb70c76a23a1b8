//! `resnet-train`: train any registered ResNet with the papers' recipes. With no flags: the paper's CIFAR-10
//! ResNet-20 (`--recipe cifar-paper --model resnet20`).

mod checkpoint;
mod curves;
mod distributed;
mod experiment;
mod metrics_log;
mod recipe;
mod schedule;
mod trainer;

use anyhow::{bail, Context, Result};
use clap::Parser;
use distributed::Collective;
use recipe::{Recipe, Schedule};
use resnet_core::parse_device;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use trainer::{RunOptions, Trainer};

/// Large tensors are allocated and freed every layer: a caching allocator avoids re-faulting their pages.
#[global_allocator]
static ALLOCATOR: resnet_infer::heap::CountingMimalloc = resnet_infer::heap::CountingMimalloc;

#[derive(Parser)]
#[command(
    name = "resnet-train",
    version,
    about = "Train ResNets with the procedures of He et al. (2016)"
)]
#[command(args_conflicts_with_subcommands = true)]
#[command(
    after_help = "Examples:\n  resnet-train                      (ResNet-20, paper recipe, CIFAR-10 from the hub)\n  resnet-train --data cifar10/ --out runs/resnet20\n  resnet-train --model resnet110 --data cifar10/ --out runs/r110\n  resnet-train --resume runs/resnet20\n  resnet-train compare runs/plain20 runs/plain56 --out plain.png\n  resnet-train experiment degradation --data cifar10/ --iterations 2000 --out runs/degradation\n  resnet-train experiment identity-mappings --data cifar10/ --depth 20 --budget 45m"
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
    /// plain-56, ResNet-20, ResNet-56), `preact` (Identity Mappings Table 3: ResNet-110 vs pre-activation) or
    /// `identity-mappings` (Identity Mappings Figs. 2 and 4: every shortcut variant and activation placement).
    Experiment {
        #[arg(value_parser = experiment::NAMES.to_vec())]
        name: String,
        /// identity-mappings: the variants to train, by key (original, scale_shortcut, scale_both,
        /// exclusive_gating, shortcut_gating, conv_shortcut, dropout_shortcut, bn_after_add, relu_before_add,
        /// relu_preact, preact, 1layer, preact_1layer) [default: all].
        #[arg(long, value_delimiter = ',')]
        variants: Option<Vec<String>>,
        /// identity-mappings: depth of the CIFAR nets (110; 164 for bottlenecks; 20 for a short run)
        /// [default: 110].
        #[arg(long)]
        depth: Option<usize>,
        /// Training per net: iterations (2000), or a time for the whole experiment (90s, 45m, 2h), turned into
        /// the same iteration count for every net from one timed step.
        #[arg(long)]
        budget: Option<experiment::Budget>,
        #[command(flatten)]
        train: Box<TrainArgs>,
    },
}

#[derive(clap::Args, Clone)]
pub(crate) struct TrainArgs {
    /// Registered network (resnet20 … resnet1202, plain20 …, preact_resnet164, resnet50, resnetv2_50, …)
    /// [default: resnet20].
    #[arg(long)]
    model: Option<String>,
    /// Dataset folder (CIFAR-10/100 binaries, or an ImageFolder with train/ and val/ or test/), or
    /// hub:OWNER/REPO[@REV][:CONFIG] for CIFAR parquet files on the Hugging Face hub [default: hub:uoft-cs/cifar10].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder: config.json, metrics.csv, checkpoints [default: runs/MODEL].
    #[arg(long, conflicts_with = "resume")]
    out: Option<PathBuf>,
    /// cifar-paper, preact-cifar, imagenet-paper or quick [default: cifar-paper].
    #[arg(long)]
    recipe: Option<String>,
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
    /// The initial bias b_g of a gated shortcut's gate, g(x) = σ(W_g x + b_g) (`*_exclusive_gating`,
    /// `*_shortcut_gating` nets) [default: -6, the paper's best].
    #[arg(long, allow_hyphen_values = true)]
    gate_bias: Option<f64>,
    /// Training images held out for validation (the paper: 5000), 0 for none.
    #[arg(long)]
    holdout: Option<usize>,
    #[arg(long)]
    eval_every: Option<u64>,
    #[arg(long)]
    log_every: Option<u64>,
    /// Seed of the initial weights, the data order and the augmentation [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Write a checkpoint every N iterations and at the end (default 1000; a resumed run keeps its own).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Numbered checkpoints to keep (default 3; a resumed run keeps its own).
    #[arg(long)]
    keep: Option<usize>,
    /// Continue the run in this folder from its newest readable checkpoint, with its own recipe (only
    /// --iterations/--epochs, --data, --checkpoint-every, --keep, --threads, --strict, --recompute, --device,
    /// --accumulate and --distributed may be given; ranks × --accumulate must stay the same).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Decode threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Fail on the first unreadable image instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Keep only the activations between ⌈√units⌉ segments of the net and recompute the rest in backward
    /// (as torch.utils.checkpoint): less memory, one more forward pass per step, the same results.
    #[arg(long)]
    recompute: bool,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Sum the gradients of K micro-batches of --batch-size before each update: a global batch of
    /// batch-size × K (× ranks) images [default: 1; a resumed run keeps its global batch].
    #[arg(long)]
    accumulate: Option<usize>,
    /// Data-parallel training, one process per rank under an MPI launcher (`mpirun -np N resnet-train
    /// --distributed …`; needs the `mpi` feature): --batch-size is per rank, rank 0 writes the run folder.
    #[arg(long)]
    distributed: bool,
}

fn main() {
    resnet_infer::exit_quietly_when_stdout_closes();
    resnet_infer::keep_freed_memory();
    resnet_core::threads::use_one_compute_pool();
    let cli: Cli = resnet_infer::parse_args();
    if let Err(e) = resnet_core::ops::isa::select_from_env() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let distributed = cli.train.distributed;
    if distributed {
        distributed::share_cores();
    }
    let world: Rc<dyn Collective> = match distributed::join(distributed) {
        Ok(world) => world.into(),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    let result = match cli.command {
        None => train(&cli.train, world.clone()).map(|_| ()),
        Some(Command::Compare { runs, out }) => compare(&runs, &out),
        Some(Command::Experiment {
            name,
            variants,
            depth,
            budget,
            train,
        }) => experiment::run(&experiment::ExperimentArgs {
            name: &name,
            variants: variants.as_deref(),
            depth,
            budget,
            train: &train,
        }),
    };
    if let Err(e) = result {
        let line = match world.ranks() {
            1 => format!("error: {e:#}\n"),
            n => format!("error (rank {} of {n}): {e:#}\n", world.rank()),
        };
        // One write of the whole line: `eprintln!` writes it piece by piece (stderr is unbuffered), and mpirun's
        // own message about the failed rank landed in the middle of another rank's line.
        let _ = std::io::stderr().write_all(line.as_bytes());
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

/// A run to start or continue: the recipe, where and how, and (resume) the iteration count to extend to.
pub(crate) struct TrainJob {
    recipe: Recipe,
    options: RunOptions,
    resume: bool,
    extend_to: Option<u64>,
}

/// Iterations in `epochs` passes over the training images of `data` (less the recipe's held-out images).
fn epochs_to_iterations(epochs: u64, data: &Path, recipe: &Recipe) -> Result<u64> {
    let source = datasets::DataSource::open(data)?;
    let train = source
        .train
        .as_ref()
        .or(source.test.as_ref())
        .map_or(0, |s| s.len());
    let per_epoch =
        (train.saturating_sub(recipe.validation_holdout) / recipe.batch_size).max(1) as u64;
    Ok(epochs * per_epoch)
}

/// Every flag into the recipe and the run options, in one place. `TrainArgs` is destructured in full (no `..`):
/// a new flag that is not wired here does not compile.
impl TryFrom<&TrainArgs> for TrainJob {
    type Error = anyhow::Error;

    fn try_from(args: &TrainArgs) -> Result<Self> {
        let TrainArgs {
            model,
            data,
            out,
            recipe,
            iterations,
            epochs,
            batch_size,
            lr,
            momentum,
            weight_decay,
            nesterov,
            no_decay_norm_bias,
            milestones,
            label_smoothing,
            bn_recalibrate,
            zero_init_residual,
            gate_bias,
            holdout,
            eval_every,
            log_every,
            seed,
            checkpoint_every,
            keep,
            resume,
            threads,
            strict,
            recompute,
            device,
            accumulate,
            distributed: _,
        } = args;
        if *accumulate == Some(0) {
            bail!("--accumulate must be at least 1");
        }
        positive("lr", *lr)?;
        if *batch_size == Some(0) {
            bail!("--batch-size must be at least 1");
        }
        let ranges = [
            ("momentum", *momentum, 1.0),
            ("label-smoothing", *label_smoothing, 1.0),
            ("weight-decay", *weight_decay, f64::INFINITY),
        ];
        for (name, value, end) in ranges {
            if let Some(v) = value.filter(|v| !(0.0..end).contains(v)) {
                bail!("--{name} must be in [0, {end}), got {v}");
            }
        }
        if *iterations == Some(0) || *epochs == Some(0) {
            bail!("--iterations / --epochs must be at least 1");
        }
        let device = parse_device(device)?;

        if let Some(dir) = resume {
            // A resumed run continues with the recipe it was started with: a flag that would change it is an
            // error, never silently dropped.
            let recipe_flags = [
                ("--model", model.is_some()),
                ("--recipe", recipe.is_some()),
                ("--batch-size", batch_size.is_some()),
                ("--lr", lr.is_some()),
                ("--momentum", momentum.is_some()),
                ("--weight-decay", weight_decay.is_some()),
                ("--nesterov", *nesterov),
                ("--no-decay-norm-bias", *no_decay_norm_bias),
                ("--milestones", milestones.is_some()),
                ("--label-smoothing", label_smoothing.is_some()),
                ("--bn-recalibrate", bn_recalibrate.is_some()),
                ("--zero-init-residual", *zero_init_residual),
                ("--gate-bias", gate_bias.is_some()),
                ("--holdout", holdout.is_some()),
                ("--eval-every", eval_every.is_some()),
                ("--log-every", log_every.is_some()),
                ("--seed", seed.is_some()),
            ];
            if let Some((flag, _)) = recipe_flags.iter().find(|(_, given)| *given) {
                bail!(
                    "{flag} cannot change a resumed run: {} continues with the recipe in its config.json (start a new run with --out to change it)",
                    dir.display()
                );
            }
            let saved = saved_config(dir)?;
            let saved_recipe: Recipe = serde_json::from_value(saved["recipe"].clone())
                .with_context(|| format!("the recipe in {}", dir.join("config.json").display()))?;
            let saved_value = |key: &str| saved[key].as_u64();
            let data = match data {
                Some(d) => d.clone(),
                None => saved["data"].as_str().map(PathBuf::from).with_context(|| {
                    format!(
                        "{} has no data folder: pass --data",
                        dir.join("config.json").display()
                    )
                })?,
            };
            let extend_to = match epochs {
                Some(e) => Some(epochs_to_iterations(*e, &data, &saved_recipe)?),
                None => *iterations,
            };
            let options = RunOptions {
                data,
                out: dir.clone(),
                seed: saved["seed"].as_u64().unwrap_or(0),
                checkpoint_every: checkpoint_every
                    .or(saved_value("checkpoint_every"))
                    .unwrap_or(1000),
                keep: keep
                    .or(saved_value("keep").map(|k| k as usize))
                    .unwrap_or(3)
                    .max(1),
                threads: *threads,
                strict: *strict,
                recompute: *recompute,
                accumulate: *accumulate,
                device,
            };
            return Ok(TrainJob {
                recipe: saved_recipe,
                options,
                resume: true,
                extend_to,
            });
        }

        let model = model.clone().unwrap_or_else(|| "resnet20".into());
        let recipe_name = recipe.as_deref().unwrap_or("cifar-paper");
        let config = resnet_core::config_for(&model)?;
        let mut r = Recipe::named(recipe_name, &model, config.depth()).with_context(|| {
            format!(
                "unknown recipe `{recipe_name}`: expected one of {}",
                recipe::NAMES.join(", ")
            )
        })?;
        r.batch_size = batch_size.unwrap_or(r.batch_size);
        r.sgd.lr = lr.unwrap_or(r.sgd.lr);
        r.sgd.momentum = momentum.unwrap_or(r.sgd.momentum);
        r.sgd.weight_decay = weight_decay.unwrap_or(r.sgd.weight_decay);
        r.sgd.nesterov |= *nesterov;
        r.sgd.decay_norm_and_bias &= !*no_decay_norm_bias;
        if let Some(m) = milestones {
            r.schedule = Schedule::Step {
                milestones: m.clone(),
                factor: 0.1,
            };
        }
        r.label_smoothing = label_smoothing.unwrap_or(r.label_smoothing);
        r.zero_init_residual |= *zero_init_residual;
        r.gate_bias = *gate_bias;
        // Refused here, before any data is read, if the net cannot take them.
        r.model_config()?;
        r.bn_recalibration_batches = bn_recalibrate.unwrap_or(r.bn_recalibration_batches);
        r.validation_holdout = holdout.unwrap_or(r.validation_holdout);
        r.eval_every = eval_every.unwrap_or(r.eval_every);
        r.log_every = log_every.unwrap_or(r.log_every);
        let data = data.clone().unwrap_or_else(|| {
            eprintln!(
                "no --data given: CIFAR-10 from the Hugging Face hub ({}), cached by hf-hub",
                datasets::DEFAULT_HUB_DATA
            );
            PathBuf::from(datasets::DEFAULT_HUB_DATA)
        });
        if let Some(n) = iterations {
            r.iterations = *n;
        }
        if let Some(e) = epochs {
            r.iterations = epochs_to_iterations(*e, &data, &r)?;
        }
        let options = RunOptions {
            data,
            out: out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(&model)),
            seed: seed.unwrap_or(0),
            checkpoint_every: checkpoint_every.unwrap_or(1000),
            keep: keep.unwrap_or(3).max(1),
            threads: *threads,
            strict: *strict,
            recompute: *recompute,
            accumulate: *accumulate,
            device,
        };
        Ok(TrainJob {
            recipe: r,
            options,
            resume: false,
            extend_to: None,
        })
    }
}

/// Trains one network in `world` (one process, or this rank of a data-parallel job); returns its run folder.
pub(crate) fn train(args: &TrainArgs, world: Rc<dyn Collective>) -> Result<PathBuf> {
    let TrainJob {
        recipe,
        options,
        resume,
        extend_to,
    } = args.try_into()?;
    let out = options.out.clone();
    let lead = world.rank() == 0;
    let mut trainer = Trainer::new(recipe, options, resume, extend_to, world)?;
    if !resume && lead {
        eprintln!(
            "recipe:\n{}",
            serde_json::to_string_pretty(trainer.recipe())?
        );
    }
    let error = trainer.run()?;
    if !lead {
        return Ok(out);
    }
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

pub(crate) fn compare(runs: &[PathBuf], out: &std::path::Path) -> Result<()> {
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

/// The `config.json` a run was started with.
pub(crate) fn saved_config(out: &std::path::Path) -> Result<serde_json::Value> {
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
