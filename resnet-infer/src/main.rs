//! `resnet-infer`: evaluate, classify, summarise and benchmark ResNets.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use clap::{Args, Parser, Subcommand};
use datasets::{DataSource, Normalize};
use rand::SeedableRng;
use resnet_core::threads::on_pool;
use resnet_core::{config_for, parse_device, Model};
use resnet_infer::evaluate::{eval_pipeline, EvalOptions};
use resnet_infer::{class_names, evaluate, load_model, metrics::top_k};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Large tensors are allocated and freed every layer: a caching allocator avoids re-faulting their pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Per-channel mean on [0,1] pixels, e.g. 0.485,0.456,0.406 (default: the weights' metadata, else ImageNet's).
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
    /// What the data is: checks the class count and sets the default normalisation when the weights carry none
    /// (cifar10/cifar100: CIFAR-10 statistics; imagenet: ImageNet statistics).
    #[arg(long, value_parser = ["cifar10", "cifar100", "imagenet"])]
    dataset: Option<String>,
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
    #[arg(long)]
    model: String,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Input side in pixels (default: 32 for CIFAR nets, 224 for ImageNet nets).
    #[arg(long)]
    input: Option<usize>,
    /// Time a training step (forward, backward, SGD update) instead of inference.
    #[arg(long)]
    train: bool,
    /// Timed iterations (after two warm-up iterations).
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Inference with BatchNorm as separate layers instead of folded into the convolutions.
    #[arg(long)]
    no_fold: bool,
    /// Also time the CPU convolution op on each distinct convolution shape of the net (forward, input
    /// gradient, weight gradient) and print GFLOP/s per shape.
    #[arg(long)]
    convs: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    json: bool,
}

fn main() {
    resnet_infer::keep_freed_memory();
    resnet_core::threads::use_one_compute_pool();
    if let Err(e) = run(resnet_infer::parse_args::<Cli>()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Eval(a) => eval(a),
        Command::Classify(a) => classify(a),
        Command::Summary(a) => summary(a),
        Command::Bench(a) => bench(a),
    }
}

/// `--mean/--std`, else the weights' metadata, else ImageNet statistics.
fn normalization(args: &WeightsArgs, from_weights: Option<Normalize>) -> Result<Normalize> {
    match (&args.mean, &args.std) {
        (Some(m), Some(s)) => Ok(Normalize::parse(m, s)?),
        (None, None) => Ok(from_weights.unwrap_or(Normalize::IMAGENET)),
        _ => bail!("--mean and --std go together"),
    }
}

fn eval(args: EvalArgs) -> Result<()> {
    let device = parse_device(&args.common.device)?;
    let loaded = load_model(args.common.model.as_deref(), &args.common.weights, &device)?;
    let source = DataSource::open_test(&args.data)?;
    eprintln!("{}", source.summary());
    let split = source
        .test
        .or(source.train)
        .context("the dataset has no images")?;
    let classes = split.classes.clone();
    let options = EvalOptions {
        batch_size: args.batch_size,
        normalize: normalization(&args.common, loaded.normalize)?,
        crop_pct: args.common.crop_pct,
        strict: args.strict,
        device,
        fold: !args.common.no_fold,
        ..Default::default()
    };
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
    if args.common.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn classify(args: ClassifyArgs) -> Result<()> {
    let device = parse_device(&args.common.device)?;
    let loaded = load_model(args.common.model.as_deref(), &args.common.weights, &device)?;
    let options = EvalOptions {
        normalize: normalization(&args.common, loaded.normalize)?,
        crop_pct: args.common.crop_pct,
        ..Default::default()
    };
    let pipeline = eval_pipeline(loaded.model.config().family, &options)?;
    let names = class_names::for_head(loaded.model.config().num_classes);
    let predictor = loaded.model.predictor(!args.common.no_fold)?;
    // Evaluation pipelines draw no random numbers; the generator only satisfies the signature.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for path in &args.images {
        let img = datasets::transforms::open_rgb(path)?;
        let (chw, (h, w)) = pipeline.apply(&img, &mut rng)?;
        let x = Tensor::from_vec(chw, (1, 3, h, w), &device)?;
        let probs = candle_nn::ops::softmax(&predictor.forward(&x)?, D::Minus1)?;
        let probs = probs.flatten_all()?.to_vec1::<f32>()?;
        let top: Vec<serde_json::Value> = top_k(&probs, 5)
            .into_iter()
            .map(|i| serde_json::json!({"index": i, "name": names[i], "probability": probs[i]}))
            .collect();
        if args.common.json {
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

fn default_side(model: &Model) -> usize {
    match model.config().family {
        resnet_core::Family::Cifar => 32,
        resnet_core::Family::ImageNet => 224,
    }
}

fn summary(args: SummaryArgs) -> Result<()> {
    let mut config = config_for(&args.model)?;
    if let Some(c) = args.classes {
        config.num_classes = c;
    }
    let model = Model::new(&config, 0, &Device::Cpu)?;
    let side = args.input.unwrap_or_else(|| default_side(&model));
    let layers = model.net.layers((side, side));
    let params = model.parameter_count();
    let macs: u64 = layers.iter().map(|l| l.macs).sum();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"model": args.model, "input": side, "params": params, "macs": macs, "layers": layers})
        );
        return Ok(());
    }
    println!(
        "{} ({} layers) at {side}×{side}",
        args.model,
        config.depth()
    );
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

/// Peak resident memory of this process (VmHWM), in MB; 0 where /proc is not available.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.batch_size == 0 || args.iterations == 0 {
        bail!("--batch-size and --iterations must be at least 1");
    }
    let device = parse_device(&args.device)?;
    let model = Model::by_name(&args.model, 0, &device)?;
    let side = args.input.unwrap_or_else(|| default_side(&model));
    let x = Tensor::randn(0f32, 1.0, (args.batch_size, 3, side, side), &device)?;
    let classes = model.config().num_classes as u32;
    let labels: Vec<u32> = (0..args.batch_size as u32).map(|i| i % classes).collect();
    let y = Tensor::new(labels.as_slice(), &device)?;
    let mut sgd = resnet_core::optim::Sgd::new(model.trainable_vars(), Default::default());
    let predictor = model.predictor(!args.no_fold)?;
    // Time spent in forward (with the loss), backward and update over the timed training steps.
    let mut phases = [Duration::ZERO; 3];
    let mut step = |phases: &mut [Duration; 3]| -> Result<()> {
        if args.train {
            // As resnet-train's loop: each phase on rayon's pool (resnet_core::threads::on_pool).
            let t0 = Instant::now();
            let loss = on_pool(&device, || {
                candle_nn::loss::cross_entropy(&model.forward_t(&x, true)?, &y)
            })?;
            let t1 = Instant::now();
            let grads = on_pool(&device, || loss.backward())?;
            let t2 = Instant::now();
            let sgd = &mut sgd;
            on_pool(&device, || sgd.step(&grads))?;
            let t3 = Instant::now();
            for (phase, (a, b)) in phases.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3)]) {
                *phase += b - a;
            }
        } else {
            predictor.forward(&x)?.to_device(&Device::Cpu)?;
        }
        Ok(())
    };
    // Two warm-up steps, as ../shared/reference/pytorch_bench.py: the first training step also creates the
    // momentum buffers, and the allocator's arena is still growing.
    step(&mut [Duration::ZERO; 3])?;
    step(&mut [Duration::ZERO; 3])?;
    let start = Instant::now();
    for _ in 0..args.iterations {
        step(&mut phases)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let ips = (args.batch_size * args.iterations) as f64 / seconds;
    let mode = match (args.train, predictor.is_folded()) {
        (true, _) => "train step",
        (false, true) => "inference (BN folded)",
        (false, false) => "inference",
    };
    let rss = peak_rss_mb();
    println!(
        "{} {mode}, batch {}, {side}×{side}: {ips:.1} img/s, peak RSS {rss:.0} MB",
        args.model, args.batch_size
    );
    if args.train {
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / args.iterations as f64;
        println!(
            "per step: forward {:.1} ms, backward {:.1} ms, update {:.1} ms",
            ms(phases[0]),
            ms(phases[1]),
            ms(phases[2])
        );
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"model": args.model, "mode": mode, "batch_size": args.batch_size, "input": side,
                "images_per_second": ips, "peak_rss_mb": rss, "device": args.device})
        );
    }
    if args.convs {
        let shapes = model.conv_shapes((side, side));
        let timings =
            resnet_infer::conv_bench::time_convs(&shapes, args.batch_size, args.iterations)?;
        print!(
            "{}",
            resnet_infer::conv_bench::table(&timings, args.batch_size)
        );
    }
    Ok(())
}
