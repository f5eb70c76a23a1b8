//! `resnet-infer bench`: throughput and peak memory of inference or of the training step that `resnet-train`
//! runs ([`resnet_core::train_step`]), on random data.

use crate::conv_bench::{time_convs, ConvTiming};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use resnet_core::ops::isa::Isa;
use resnet_core::ops::peak::{fma_peak, Peak};
use resnet_core::optim::Sgd;
use resnet_core::recompute;
use resnet_core::{cross_entropy, saved_tensor_bytes, train_step, Family, Model, StepOptions};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: String,
    pub batch_size: usize,
    /// Input side; `None`: 32 for CIFAR nets, 224 for ImageNet nets.
    pub input: Option<usize>,
    /// Time a training step instead of inference.
    pub train: bool,
    /// Training with activations recomputed per segment ([`resnet_core::recompute`]).
    pub recompute: bool,
    /// Timed iterations, after two warm-up iterations.
    pub iterations: usize,
    /// Inference with BatchNorm folded into the convolutions.
    pub fold: bool,
    /// Also time the convolution op on each distinct conv shape of the net.
    pub convs: bool,
    /// Also measure this machine's FMA peak for the kernel set in use (always with `convs`).
    pub peak: bool,
    pub device: Device,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub mode: &'static str,
    pub batch_size: usize,
    pub input: usize,
    pub iterations: usize,
    /// Images through the timed iterations: iterations × batch size.
    pub images: usize,
    pub seconds: f64,
    pub images_per_second: f64,
    pub peak_rss_mb: f64,
    /// Heap bytes in use after the timed iterations (parameters, momenta, caches), in MB: what the steps leave
    /// behind, the same after 20 steps as after 200 unless something leaks.
    pub live_heap_mb: f64,
    pub device: String,
    /// The CPU kernel set that ran (`RESNET_CPU_ISA`): avx512, avx2 or generic.
    pub isa: &'static str,
    /// Training: the layout of the activations between the stem and the head, `channel-blocked` where the net
    /// trains on blocked tensors (`ResNet::trains_blocked`), else `NCHW`.
    pub activations: Option<&'static str>,
    /// This machine's f32 FMA peak for that kernel set, all threads, in GFLOP/s (with `--peak` or `--convs`).
    pub peak_gflops: Option<f64>,
    /// Training: mean milliseconds per step of forward (with the loss), backward and update.
    pub forward_ms: Option<f64>,
    pub backward_ms: Option<f64>,
    pub update_ms: Option<f64>,
    /// Training: what the forward pass keeps for backward (every tensor of the autograd graph but the
    /// parameters), in MB.
    pub saved_activations_mb: Option<f64>,
    /// With `--convs`: each distinct convolution (shape, how often the net applies it, per pass of
    /// `[forward, input gradient, weight gradient]` seconds, GFLOP/s and algorithm, and the blocked inference
    /// forward's); left out of the JSON without it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub convs: Vec<ConvTiming>,
}

/// How long the FMA peak is timed.
pub const PEAK_TIME: Duration = Duration::from_millis(500);

/// `bench --peak` without a model: the FMA peak of the kernel set in use.
pub fn peak_only() -> Peak {
    fma_peak(Isa::current(), PEAK_TIME)
}

/// The input side a network is benchmarked and summarised at by default.
pub fn default_side(model: &Model) -> usize {
    match model.config().family {
        Family::Cifar => 32,
        Family::ImageNet => 224,
    }
}

/// Peak resident memory of this process (VmHWM), in MB; 0 where /proc is not available.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn bench(options: &BenchOptions) -> Result<BenchReport> {
    if options.batch_size == 0 || options.iterations == 0 {
        bail!("--batch-size and --iterations must be at least 1");
    }
    let device = &options.device;
    let model = Model::by_name(&options.model, 0, device)?;
    let side = options.input.unwrap_or_else(|| default_side(&model));
    let x = Tensor::randn(0f32, 1.0, (options.batch_size, 3, side, side), device)?;
    let classes = model.config().num_classes as u32;
    let labels: Vec<u32> = (0..options.batch_size as u32)
        .map(|i| i % classes)
        .collect();
    let y = Tensor::new(labels.as_slice(), device)?;
    let mut sgd = Sgd::new(model.trainable_vars(), Default::default());
    let predictor = model.predictor(options.fold)?;
    let step_options = StepOptions {
        label_smoothing: 0.0,
        recompute: options.recompute,
    };
    // Forward, backward and update time over the timed training steps.
    let mut phases = [Duration::ZERO; 3];
    let mut step = |phases: &mut [Duration; 3]| -> Result<()> {
        if options.train {
            let s = train_step(&model, &mut sgd, &x, &y, &step_options)?;
            for (total, t) in phases.iter_mut().zip([s.forward, s.backward, s.update]) {
                *total += t;
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
    for _ in 0..options.iterations {
        step(&mut phases)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let live_heap_mb = crate::heap::live_bytes() as f64 / 1e6;
    let images = options.batch_size * options.iterations;
    let mode = match (options.train, predictor.is_folded()) {
        (true, _) => "train step",
        (false, true) => "inference (BN folded)",
        (false, false) => "inference",
    };
    let ms = |d: Duration| {
        options
            .train
            .then(|| d.as_secs_f64() * 1e3 / options.iterations as f64)
    };
    let saved_activations_mb = match options.train {
        true => Some(saved_activations(&model, &x, &y, options.recompute)? as f64 / 1e6),
        false => None,
    };
    let isa = Isa::current();
    // The steps' own peak, before `--convs` holds every conv shape's tensors at once.
    let peak_rss = peak_rss_mb();
    let blocked = model.net.trains_blocked(&x, options.train);
    let (convs, peak_gflops) = if options.convs {
        let report = time_convs(
            &model.conv_shapes((side, side)),
            options.batch_size,
            options.iterations,
            blocked,
        )?;
        (report.timings, Some(report.peak_gflops))
    } else {
        let peak = options.peak.then(|| fma_peak(isa, PEAK_TIME).gflops);
        (Vec::new(), peak)
    };
    Ok(BenchReport {
        model: options.model.clone(),
        mode,
        batch_size: options.batch_size,
        input: side,
        iterations: options.iterations,
        images,
        seconds,
        images_per_second: images as f64 / seconds,
        peak_rss_mb: peak_rss,
        live_heap_mb,
        device: resnet_core::device_name(device),
        isa: isa.name(),
        activations: options.train.then_some(match blocked {
            Some(_) => "channel-blocked",
            None => "NCHW",
        }),
        peak_gflops,
        forward_ms: ms(phases[0]),
        backward_ms: ms(phases[1]),
        update_ms: ms(phases[2]),
        saved_activations_mb,
        convs,
    })
}

/// Bytes that a training forward pass (with the loss) keeps for backward: after the timed steps, so the peak
/// RSS above is the steps' own. With recomputation, what the segmented forward keeps (the boundaries and the
/// head), the recomputed segments come and go during backward.
fn saved_activations(model: &Model, x: &Tensor, y: &Tensor, recompute: bool) -> Result<usize> {
    let bytes = if recompute {
        let pass = recompute::forward(model, x)?;
        let loss = cross_entropy(&pass.logits, y, 0.0)?;
        saved_tensor_bytes(&loss) + pass.boundary_bytes()
    } else {
        saved_tensor_bytes(&cross_entropy(&model.forward_t(x, true)?, y, 0.0)?)
    };
    Ok(bytes)
}
