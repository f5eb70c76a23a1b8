//! `resnet-infer`: evaluate, classify, summarise and benchmark ResNets.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use clap::{Args, Parser, Subcommand};
use datasets::{DataSource, Normalize, Split};
use rand::SeedableRng;
use resnet_core::{config_for, parse_device, Model, ResNetConfig};
use resnet_infer::bench::{bench, default_side, BenchOptions};
use resnet_infer::evaluate::{check_options, eval_pipeline};
use resnet_infer::{choose_normalization, class_names, evaluate, load_model, metrics::top_k};
use resnet_infer::{EvalDataset, EvalOptions, LoadedModel};
use std::path::PathBuf;

/// Large tensors are allocated and freed every layer: a caching allocator avoids re-faulting their pages.
#[global_allocator]
static ALLOCATOR: resnet_infer::heap::CountingMimalloc = resnet_infer::heap::CountingMimalloc;

#[derive(Parser)]
#[command(
    name = "resnet-infer",
    version,
    about = "Evaluate, classify with, summarise and benchmark ResNets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Top-1 / top-5 error on a dataset (CIFAR binaries or an ImageFolder; its test/ or val/ split).
    #[command(
        after_help = "Example:\n  resnet-infer eval --model resnet20 \\\n    --weights ../shared/weights/cifar10-resnet20.safetensors --data cifar10-jpg/"
    )]
    Eval(EvalArgs),
    /// Top-5 classes of each image.
    #[command(
        after_help = "Example:\n  resnet-infer classify --model resnet50 --weights resnet50.safetensors cat.png"
    )]
    Classify(ClassifyArgs),
    /// Layers, output shapes, parameters and multiply-adds.
    #[command(after_help = "Example:\n  resnet-infer summary --model resnet50 --input 224")]
    Summary(SummaryArgs),
    /// Throughput (img/s) and peak memory of inference or a training step.
    #[command(after_help = "Example:\n  resnet-infer bench --model resnet50 --batch-size 16")]
    Bench(BenchArgs),
}

#[derive(Args)]
struct WeightsArgs {
    /// Registered network name (resnet20, resnet50, resnetv2_50, …); optional for the project's own checkpoints.
    #[arg(long)]
    model: Option<String>,
    /// A safetensors file (the project's checkpoint or a published layout).
    #[arg(long)]
    weights: String,
    /// Per-channel mean on [0,1] pixels, e.g. 0.485,0.456,0.406 (default: the weights' metadata or hub config,
    /// else --dataset's statistics, else ImageNet's).
    #[arg(long)]
    mean: Option<String>,
    /// Per-channel std, e.g. 0.229,0.224,0.225.
    #[arg(long)]
    std: Option<String>,
    /// Fraction of the resized image kept by the centre crop (ImageNet family): resize to 224 / crop-pct.
    #[arg(long, default_value_t = 0.875)]
    crop_pct: f64,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Keep BatchNorm as separate layers (by default it is folded into the convolutions).
    #[arg(long)]
    no_fold: bool,
    /// Print one JSON object (eval, summary, bench) or one per image (classify) as the last output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    common: WeightsArgs,
    /// Dataset folder: CIFAR binaries, or an ImageFolder root (uses its test/ or val/ split when present), or
    /// hub:OWNER/REPO[@REV][:CONFIG] for CIFAR parquet files on the Hugging Face hub (e.g. hub:uoft-cs/cifar10).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 250)]
    batch_size: usize,
    /// What the data is: the data and the network's head must have its class count (10, 100, 1000), and its
    /// training-set statistics normalise the images when neither --mean/--std nor the weights say.
    #[arg(long, value_enum)]
    dataset: Option<EvalDataset>,
    /// Average over the paper's ten crops (corners, centre, and their mirror images).
    #[arg(long)]
    ten_crop: bool,
    /// Fully-convolutional multi-scale evaluation over these shorter sides, e.g. 224,256,384,480,640.
    #[arg(long, value_delimiter = ',')]
    multi_scale: Vec<u32>,
    /// Fail on the first unreadable image instead of skipping it.
    #[arg(long)]
    strict: bool,
}

#[derive(Args)]
struct ClassifyArgs {
    #[command(flatten)]
    common: WeightsArgs,
    /// Image files (jpg, png).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Args)]
struct SummaryArgs {
    #[arg(long)]
    model: String,
    /// Input side in pixels (default: 32 for CIFAR nets, 224 for ImageNet nets).
    #[arg(long)]
    input: Option<usize>,
    #[arg(long)]
    classes: Option<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Registered network name (required unless --peak is given alone).
    #[arg(long, required_unless_present = "peak")]
    model: Option<String>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Input side in pixels (default: 32 for CIFAR nets, 224 for ImageNet nets).
    #[arg(long)]
    input: Option<usize>,
    /// Time a training step (forward, backward, SGD update) instead of inference.
    #[arg(long)]
    train: bool,
    /// With --train: recompute activations per segment in backward (as resnet-train --recompute).
    #[arg(long)]
    recompute: bool,
    /// Timed iterations (after two warm-up iterations).
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Inference with BatchNorm as separate layers instead of folded into the convolutions.
    #[arg(long)]
    no_fold: bool,
    /// Also time the CPU convolution op on each distinct convolution shape of the net (forward, input
    /// gradient — not for the first layer, whose input needs none in training —, weight gradient) and print
    /// GFLOP/s per shape (the median of --iterations calls) and its share of the machine's FMA peak.
    #[arg(long)]
    convs: bool,
    /// Measure this machine's f32 FMA peak (a register-only FMA loop on every thread) for the kernel set in
    /// use; alone (without --model) it prints only that.
    #[arg(long)]
    peak: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    json: bool,
}

fn main() {
    resnet_infer::keep_freed_memory();
    resnet_infer::exit_quietly_when_stdout_closes();
    resnet_core::threads::use_one_compute_pool();
    if let Err(e) = run(resnet_infer::parse_args::<Cli>()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    resnet_core::ops::isa::select_from_env()?;
    match cli.command {
        Command::Eval(a) => eval(a),
        Command::Classify(a) => classify(a),
        Command::Summary(a) => summary(a),
        Command::Bench(a) => bench_command(a),
    }
}

// Each subcommand's arguments become library options in one conversion. The argument structs are destructured
// in full (no `..`), and the options are written out in full (no `..Default::default()`): a new flag that is not
// wired to the library does not compile.

/// The model and the options of [`WeightsArgs`], shared by `eval` and `classify`.
struct Weights {
    loaded: LoadedModel,
    /// `--mean/--std`, when given.
    explicit_normalize: Option<Normalize>,
    crop_pct: f64,
    device: Device,
    fold: bool,
    json: bool,
}

impl TryFrom<WeightsArgs> for Weights {
    type Error = anyhow::Error;

    fn try_from(args: WeightsArgs) -> Result<Self> {
        let WeightsArgs {
            model,
            weights,
            mean,
            std,
            crop_pct,
            device,
            no_fold,
            json,
        } = args;
        let explicit_normalize = match (mean, std) {
            (Some(m), Some(s)) => Some(Normalize::parse(&m, &s)?),
            (None, None) => None,
            _ => bail!("--mean and --std go together"),
        };
        let device = parse_device(&device)?;
        let loaded = load_model(model.as_deref(), &weights, &device)?;
        Ok(Weights {
            loaded,
            explicit_normalize,
            crop_pct,
            device,
            fold: !no_fold,
            json,
        })
    }
}

/// A model, its data and every evaluation option, from `eval`'s arguments.
struct EvalJob {
    loaded: LoadedModel,
    /// What the data is, for the log.
    source: String,
    split: Split,
    options: EvalOptions,
    json: bool,
}

impl TryFrom<EvalArgs> for EvalJob {
    type Error = anyhow::Error;

    fn try_from(args: EvalArgs) -> Result<Self> {
        let EvalArgs {
            common,
            data,
            batch_size,
            dataset,
            ten_crop,
            multi_scale,
            strict,
        } = args;
        if batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let Weights {
            loaded,
            explicit_normalize,
            crop_pct,
            device,
            fold,
            json,
        } = common.try_into()?;
        let source = DataSource::open_test(&data)?;
        let summary = source.summary();
        let split = source
            .test
            .or(source.train)
            .context("the dataset has no images")?;
        let options = EvalOptions {
            batch_size,
            normalize: choose_normalization(explicit_normalize, loaded.normalize, dataset),
            crop_pct,
            threads: 0,
            strict,
            device,
            fold,
            ten_crop,
            scales: multi_scale,
            dataset,
        };
        Ok(EvalJob {
            loaded,
            source: summary,
            split,
            options,
            json,
        })
    }
}

fn eval(args: EvalArgs) -> Result<()> {
    let EvalJob {
        loaded,
        source,
        split,
        options,
        json,
    } = args.try_into()?;
    check_options(&loaded.model, &split, &options)?;
    println!("{source}");
    let classes = split.classes.clone();
    let report = evaluate(&loaded.model, split, &options)?;
    let r = &report.accuracy;
    println!(
        "{} on {} images: top-1 error {:.2} %, top-5 error {:.2} %",
        loaded.name, r.images, r.top1_error, r.top5_error
    );
    for (name, acc) in classes.iter().zip(&r.per_class_accuracy) {
        println!("  {name:<24} {acc:6.2} %");
    }
    println!("{:.1} img/s", report.images_per_second);
    if !report.skipped.is_empty() {
        eprintln!(
            "warning: {} unreadable image(s) skipped",
            report.skipped.len()
        );
    }
    if json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// A model, the images and the preprocessing, from `classify`'s arguments.
struct ClassifyJob {
    loaded: LoadedModel,
    images: Vec<PathBuf>,
    options: EvalOptions,
    json: bool,
}

impl TryFrom<ClassifyArgs> for ClassifyJob {
    type Error = anyhow::Error;

    fn try_from(args: ClassifyArgs) -> Result<Self> {
        let ClassifyArgs { common, images } = args;
        let Weights {
            loaded,
            explicit_normalize,
            crop_pct,
            device,
            fold,
            json,
        } = common.try_into()?;
        // One image at a time, single view: the evaluation-only options keep their plain values.
        let options = EvalOptions {
            batch_size: 1,
            normalize: choose_normalization(explicit_normalize, loaded.normalize, None),
            crop_pct,
            threads: 0,
            strict: true,
            device,
            fold,
            ten_crop: false,
            scales: Vec::new(),
            dataset: None,
        };
        Ok(ClassifyJob {
            loaded,
            images,
            options,
            json,
        })
    }
}

fn classify(args: ClassifyArgs) -> Result<()> {
    let ClassifyJob {
        loaded,
        images,
        options,
        json,
    } = args.try_into()?;
    let pipeline = eval_pipeline(loaded.model.config().family, &options)?;
    let names = class_names::for_head(loaded.model.config().num_classes);
    let predictor = loaded.model.predictor(options.fold)?;
    // Evaluation pipelines draw no random numbers; the generator only satisfies the signature.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for path in &images {
        let img = datasets::transforms::open_rgb(path)?;
        let (chw, (h, w)) = pipeline.apply(&img, &mut rng)?;
        let x = Tensor::from_vec(chw, (1, 3, h, w), &options.device)?;
        let probs = candle_nn::ops::softmax(&predictor.forward(&x)?, D::Minus1)?;
        let probs = probs.flatten_all()?.to_vec1::<f32>()?;
        let top: Vec<serde_json::Value> = top_k(&probs, 5)
            .into_iter()
            .map(|i| serde_json::json!({"index": i, "name": names[i], "probability": probs[i]}))
            .collect();
        if json {
            println!(
                "{}",
                serde_json::json!({"image": path.display().to_string(), "top5": top})
            );
        } else {
            println!("{}:", path.display());
            for t in &top {
                println!(
                    "  {:>6.2} %  {} ({})",
                    t["probability"].as_f64().unwrap_or(0.0) * 100.0,
                    t["name"].as_str().unwrap_or(""),
                    t["index"]
                );
            }
        }
    }
    Ok(())
}

/// The network and the input side, from `summary`'s arguments.
struct SummaryJob {
    name: String,
    config: ResNetConfig,
    input: Option<usize>,
    json: bool,
}

impl TryFrom<SummaryArgs> for SummaryJob {
    type Error = anyhow::Error;

    fn try_from(args: SummaryArgs) -> Result<Self> {
        let SummaryArgs {
            model,
            input,
            classes,
            json,
        } = args;
        let mut config = config_for(&model)?;
        match classes {
            Some(0) => bail!("--classes must be at least 1"),
            Some(c) => config.num_classes = c,
            None => {}
        }
        if input == Some(0) {
            bail!("--input must be at least 1 pixel");
        }
        Ok(SummaryJob {
            name: model,
            config,
            input,
            json,
        })
    }
}

fn summary(args: SummaryArgs) -> Result<()> {
    let SummaryJob {
        name,
        config,
        input,
        json,
    } = args.try_into()?;
    let model = Model::new(&config, 0, &Device::Cpu)?;
    let side = input.unwrap_or_else(|| default_side(&model));
    let layers = model.net.layers((side, side));
    let params = model.parameter_count();
    let macs: u64 = layers.iter().map(|l| l.macs).sum();
    if json {
        println!(
            "{}",
            serde_json::json!({"model": name, "input": side, "classes": config.num_classes, "params": params,
                "macs": macs, "layers": layers})
        );
        return Ok(());
    }
    println!("{name} ({} layers) at {side}×{side}", config.depth());
    println!(
        "{:<24} {:>16} {:>12} {:>16}",
        "layer", "output", "params", "mult-adds"
    );
    for l in &layers {
        let shape = format!("{}×{}×{}", l.output.0, l.output.1, l.output.2);
        println!(
            "{:<24} {:>16} {:>12} {:>16}",
            l.name, shape, l.params, l.macs
        );
    }
    println!(
        "total: {params} parameters ({:.2} M), {macs} multiply-adds ({:.3} G)",
        params as f64 / 1e6,
        macs as f64 / 1e9
    );
    Ok(())
}

/// What `bench` measures: a net (with options, and whether to print JSON), or the FMA peak alone.
enum BenchJob {
    Net(BenchOptions, bool),
    Peak(bool),
}

impl TryFrom<BenchArgs> for BenchJob {
    type Error = anyhow::Error;

    fn try_from(args: BenchArgs) -> Result<Self> {
        let BenchArgs {
            model,
            batch_size,
            input,
            train,
            recompute,
            iterations,
            no_fold,
            convs,
            peak,
            device,
            json,
        } = args;
        let Some(model) = model else {
            // --peak alone: a flag that describes a net would be silently ignored.
            if train || recompute || convs || no_fold || input.is_some() {
                bail!("--train, --recompute, --convs, --no-fold and --input describe a net: add --model");
            }
            return Ok(BenchJob::Peak(json));
        };
        if recompute && !train {
            bail!("--recompute applies to a training step: add --train");
        }
        let options = BenchOptions {
            model,
            batch_size,
            input,
            train,
            recompute,
            iterations,
            fold: !no_fold,
            convs,
            peak,
            device: parse_device(&device)?,
        };
        Ok(BenchJob::Net(options, json))
    }
}

fn print_peak(gflops: f64, isa: &str) {
    println!(
        "f32 FMA peak, {isa} kernels, {} threads: {gflops:.1} GFLOP/s",
        resnet_core::threads::kernel_threads()
    );
}

fn bench_command(args: BenchArgs) -> Result<()> {
    let (options, json) = match args.try_into()? {
        BenchJob::Net(options, json) => (options, json),
        BenchJob::Peak(json) => {
            let p = resnet_infer::bench::peak_only();
            print_peak(p.gflops, p.isa.name());
            if json {
                let j = serde_json::json!({"isa": p.isa.name(), "threads": p.threads, "peak_gflops": p.gflops});
                println!("{j}");
            }
            return Ok(());
        }
    };
    let r = bench(&options)?;
    let layout = r
        .activations
        .map(|a| format!(" on {a} tensors"))
        .unwrap_or_default();
    println!(
        "{} {}{layout}, batch {}, {}×{}, {} kernels: {:.1} img/s, peak RSS {:.0} MB",
        r.model, r.mode, r.batch_size, r.input, r.input, r.isa, r.images_per_second, r.peak_rss_mb
    );
    if let Some(p) = r.peak_gflops {
        print_peak(p, r.isa);
    }
    if let (Some(f), Some(b), Some(u)) = (r.forward_ms, r.backward_ms, r.update_ms) {
        println!("per step: forward {f:.1} ms, backward {b:.1} ms, update {u:.1} ms");
    }
    if let Some(saved) = r.saved_activations_mb {
        println!("saved for backward after the forward pass: {saved:.0} MB");
    }
    if !r.convs.is_empty() {
        print!(
            "{}",
            resnet_infer::conv_bench::table(
                &r.convs,
                options.batch_size,
                r.peak_gflops,
                r.activations.unwrap_or("NCHW")
            )
        );
    }
    // Last, as the `--json` contract says.
    if json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
