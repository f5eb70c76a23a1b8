//! `resnet-infer bench --convs`: GFLOP/s of the convolution op on each distinct convolution shape of a net
//! (forward, input gradient, weight gradient), and each shape's share of the whole net's convolution time; beside
//! them the forward of the blocked-layout kernel that folded inference runs (`ops::blocked`).

use anyhow::Result;
use candle_core::{Device, Tensor};
use resnet_core::conv::ConvShape;
use resnet_core::ops::blocked::{lanes, Blocked, BlockedAlgorithm, BlockedConv, Source};
use resnet_core::ops::conv::{last_algorithm, Algorithm, Conv2dOp, Pass};
use resnet_core::ops::isa::Isa;
use std::time::Instant;

/// One pass of one shape: seconds per call, GFLOP/s, and the algorithm that ran.
#[derive(Debug, Clone, Copy)]
pub struct PassTiming {
    pub seconds: f64,
    pub gflops: f64,
    pub algorithm: Option<Algorithm>,
}

#[derive(Debug)]
pub struct ConvTiming {
    pub shape: ConvShape,
    /// How many times the net applies this shape.
    pub count: usize,
    /// Seconds per call and GFLOP/s (2 FLOPs per multiply-add) of each pass (forward, input gradient, weight
    /// gradient), and the algorithm it ran. `None` for a pass training never computes: the input gradient of a
    /// shape that only the net's first layer has, whose input (the images) needs none (`Conv2dOp`'s backward
    /// skips it).
    pub passes: [Option<PassTiming>; 3],
    /// Seconds and GFLOP/s per call of the blocked inference forward (bias and ReLU in its epilogue), where the
    /// shape has a blocked kernel on the kernel set in use, and its algorithm.
    pub blocked: Option<(f64, f64, BlockedAlgorithm)>,
}

/// Seconds per call of `f`: the median of `iterations` timed calls (at least one), after one warm-up call. The
/// median rather than the mean, so that a slow moment of a shared machine moves a layer's figure less.
fn seconds_per_call<T>(iterations: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iterations.max(1));
    for _ in 0..iterations.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The blocked forward of `weight` on `x` as folded inference runs it: a blocked input, or the NCHW image where
/// the input channels are not whole blocks (the stem).
fn time_blocked(
    x: &Tensor,
    weight: &Tensor,
    shape: &ConvShape,
    iterations: usize,
) -> Result<Option<(f64, BlockedAlgorithm)>> {
    let isa = Isa::current();
    if !BlockedConv::applies(isa, shape.out_channels) {
        return Ok(None);
    }
    let bias = vec![0.01f32; shape.out_channels];
    let conv = BlockedConv::new(isa, weight, &bias, (shape.stride, shape.padding), true)?;
    let (n, c, h, w) = x.dims4()?;
    let timed = if c.is_multiple_of(lanes(isa)) {
        let blocked = Blocked::from_nchw(x, lanes(isa))?;
        let source = blocked.source();
        let seconds = seconds_per_call(iterations, || Ok(conv.forward(source, None)?))?;
        (seconds, conv.algorithm(source))
    } else {
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        let image = Source::nchw(&data, (n, c, h, w));
        let seconds = seconds_per_call(iterations, || Ok(conv.forward(image, None)?))?;
        (seconds, conv.algorithm(image))
    };
    Ok(Some(timed))
}

/// Times each distinct shape of `shapes` at `batch` images, `iterations` calls per pass after one warm-up.
pub fn time_convs(
    shapes: &[ConvShape],
    batch: usize,
    iterations: usize,
) -> Result<Vec<ConvTiming>> {
    // (shape, count, whether a layer past the first has it)
    let mut distinct: Vec<(ConvShape, usize, bool)> = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        match distinct.iter_mut().find(|(d, ..)| d == s) {
            Some((_, count, inner)) => {
                *count += 1;
                *inner |= i > 0;
            }
            None => distinct.push((*s, 1, i > 0)),
        }
    }
    let dev = Device::Cpu;
    distinct
        .into_iter()
        .map(|(shape, count, input_grad_in_training)| {
            let (h, w) = shape.input;
            let (oh, ow) = shape.output();
            let x = Tensor::randn(0f32, 1.0, (batch, shape.in_channels, h, w), &dev)?;
            let k = shape.kernel;
            let weight = Tensor::randn(
                0f32,
                0.1,
                (shape.out_channels, shape.in_channels, k, k),
                &dev,
            )?;
            let dy = Tensor::randn(0f32, 1.0, (batch, shape.out_channels, oh, ow), &dev)?;
            let op = Conv2dOp {
                stride: shape.stride,
                padding: shape.padding,
            };
            let passes: [&dyn Fn() -> candle_core::Result<Tensor>; 3] = [
                &|| x.apply_op2_no_bwd(&weight, &op),
                &|| op.input_gradient(&dy, &weight, x.shape()),
                &|| op.weight_gradient(&x, &dy, weight.shape()),
            ];
            let flops = 2.0 * shape.macs() as f64 * batch as f64;
            let mut timed = [None; 3];
            for ((pass, p), t) in passes.iter().zip(Pass::ALL).zip(&mut timed) {
                if p == Pass::InputGrad && !input_grad_in_training {
                    continue;
                }
                let seconds = seconds_per_call(iterations, || Ok(pass()?))?;
                *t = Some(PassTiming {
                    seconds,
                    gflops: flops / seconds / 1e9,
                    algorithm: last_algorithm(p),
                });
            }
            let blocked = time_blocked(&x, &weight, &shape, iterations)?;
            Ok(ConvTiming {
                shape,
                count,
                passes: timed,
                blocked: blocked.map(|(s, a)| (s, flops / s / 1e9, a)),
            })
        })
        .collect()
}

/// A markdown table of the timings, with the total time of all the net's convolutions per pass; with a peak
/// (GFLOP/s), each pass's share of it.
pub fn table(timings: &[ConvTiming], batch: usize, peak: Option<f64>) -> String {
    let mut out = format!(
        "| conv (batch {batch}) | × | forward GFLOP/s | input-grad GFLOP/s | weight-grad GFLOP/s | algorithms | share of conv time | blocked inference forward GFLOP/s |\n|---|---|---|---|---|---|---|---|\n"
    );
    // Seconds per batch of all the layers of one shape: in one pass, or in all.
    let pass_seconds =
        |t: &ConvTiming, p: usize| t.count as f64 * t.passes[p].map_or(0.0, |p| p.seconds);
    let shape_seconds = |t: &ConvTiming| (0..3).map(|p| pass_seconds(t, p)).sum::<f64>();
    let total: f64 = timings.iter().map(shape_seconds).sum();
    let rate = |g: f64| match peak {
        Some(p) => format!("{g:.1} ({:.0} %)", 100.0 * g / p),
        None => format!("{g:.1}"),
    };
    for t in timings {
        let s = t.shape;
        let algorithms: Vec<String> = t
            .passes
            .iter()
            .map(|p| {
                p.and_then(|p| p.algorithm)
                    .map_or("–".into(), |a| format!("{a:?}"))
            })
            .collect();
        let cell = |p: usize| t.passes[p].map_or("– (net input)".into(), |p| rate(p.gflops));
        out += &format!(
            "| {}→{} {}×{}/{} on {}×{} | {} | {} | {} | {} | {} | {:.1} % | {} |\n",
            s.in_channels,
            s.out_channels,
            s.kernel,
            s.kernel,
            s.stride,
            s.input.0,
            s.input.1,
            t.count,
            cell(0),
            cell(1),
            cell(2),
            algorithms.join(", "),
            100.0 * shape_seconds(t) / total,
            t.blocked.map_or("–".into(), |(_, g, a)| match a {
                BlockedAlgorithm::Direct => rate(g),
                BlockedAlgorithm::Winograd => format!("{} Winograd", rate(g)),
            }),
        );
    }
    let per_pass: Vec<String> = (0..3)
        .map(|p| {
            let ms: f64 = timings.iter().map(|t| pass_seconds(t, p)).sum::<f64>() * 1e3;
            format!("{ms:.1} ms")
        })
        .collect();
    out += &format!(
        "all convolutions of the net: forward {}, input grad {}, weight grad {} per batch\n",
        per_pass[0], per_pass[1], per_pass[2]
    );
    if timings.iter().all(|t| t.blocked.is_some()) {
        let ms: f64 = timings
            .iter()
            .filter_map(|t| t.blocked.map(|(s, _, _)| t.count as f64 * s))
            .sum::<f64>()
            * 1e3;
        out += &format!(
            "all convolutions of the net, blocked inference forward: {ms:.1} ms per batch\n"
        );
    }
    out
}
