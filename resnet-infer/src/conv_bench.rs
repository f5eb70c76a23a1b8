//! `resnet-infer bench --convs`: GFLOP/s of the convolution op on each distinct convolution shape of a net
//! (forward, input gradient, weight gradient), and each shape's share of the whole net's convolution time; beside
//! them the forward of the blocked-layout kernel that folded inference runs (`ops::blocked`).

use anyhow::Result;
use candle_core::{Device, Tensor};
use resnet_core::conv::ConvShape;
use resnet_core::ops::blocked::{lanes, Blocked, BlockedAlgorithm, BlockedConv, Source};
use resnet_core::ops::channel_blocks::to_blocked;
use resnet_core::ops::conv::{last_algorithm, Algorithm, Conv2dOp, Pass};
use resnet_core::ops::isa::Isa;
use resnet_core::ops::peak::fma_peak;
use serde::Serialize;
use std::time::{Duration, Instant};

/// One pass of one shape: seconds per call, GFLOP/s, and the algorithm that ran.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PassTiming {
    pub seconds: f64,
    pub gflops: f64,
    pub algorithm: Option<Algorithm>,
}

/// The blocked inference forward of one shape: seconds and GFLOP/s per call, and its algorithm.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct InferenceTiming {
    pub seconds: f64,
    pub gflops: f64,
    pub algorithm: BlockedAlgorithm,
}

#[derive(Debug, Serialize)]
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
    pub blocked: Option<InferenceTiming>,
}

/// One timed call: a pass of one shape, or its blocked inference forward.
type Call<'a> = Box<dyn Fn() -> Result<()> + 'a>;

/// Seconds per call of each of `calls` (warmed up): the median of `rounds` (at least one). The calls take turns,
/// round after round, so that a slow moment of a shared machine spreads over every layer instead of falling on
/// one; the median rather than the mean, so that it moves a layer's figure less. `each_round` runs after the
/// calls of every round.
fn seconds_per_call(
    calls: &[Call],
    rounds: usize,
    mut each_round: impl FnMut(),
) -> Result<Vec<f64>> {
    let mut times = vec![Vec::with_capacity(rounds.max(1)); calls.len()];
    for _ in 0..rounds.max(1) {
        for (call, times) in calls.iter().zip(&mut times) {
            let start = Instant::now();
            call()?;
            times.push(start.elapsed().as_secs_f64());
        }
        each_round();
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

/// The tensors of one distinct shape, in the layout training gives them.
struct ShapeData {
    shape: ConvShape,
    count: usize,
    /// Whether a layer past the first has the shape (else training computes no input gradient for it).
    input_grad_in_training: bool,
    op: Conv2dOp,
    /// The input and the output gradient as training passes them: NCHW, or in blocks of `lanes`.
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    /// The blocked inference forward's kernel (bias and ReLU in its epilogue) and input, where the kernel set
    /// has one for the shape.
    inference: Option<(BlockedConv, InferenceInput)>,
}

enum InferenceInput {
    Blocked(Blocked),
    /// The NCHW image where the input channels are not whole blocks (the stem).
    Nchw(Vec<f32>, (usize, usize, usize, usize)),
}

impl InferenceInput {
    fn source(&self) -> Source<'_> {
        match self {
            InferenceInput::Blocked(b) => b.source(),
            InferenceInput::Nchw(data, dims) => Source::nchw(data, *dims),
        }
    }
}

impl ShapeData {
    /// Random tensors for `shape` at `batch` images; `blocked`: the blocks training uses (`ResNet::trains_blocked`).
    fn new(
        (shape, count, input_grad_in_training): (ConvShape, usize, bool),
        batch: usize,
        blocked: Option<usize>,
    ) -> Result<Self> {
        let dev = Device::Cpu;
        let (h, w) = shape.input;
        let (oh, ow) = shape.output();
        let k = shape.kernel;
        let x_nchw = Tensor::randn(0f32, 1.0, (batch, shape.in_channels, h, w), &dev)?;
        let weight = Tensor::randn(
            0f32,
            0.1,
            (shape.out_channels, shape.in_channels, k, k),
            &dev,
        )?;
        let dy = Tensor::randn(0f32, 1.0, (batch, shape.out_channels, oh, ow), &dev)?;
        let (x, dy) = match blocked {
            // The stem reads the NCHW images and writes blocks.
            Some(lanes) if !shape.in_channels.is_multiple_of(lanes) => {
                (x_nchw.clone(), to_blocked(&dy, lanes)?)
            }
            Some(lanes) => (to_blocked(&x_nchw, lanes)?, to_blocked(&dy, lanes)?),
            None => (x_nchw.clone(), dy),
        };
        let isa = Isa::current();
        let inference = match BlockedConv::applies(isa, shape.out_channels) {
            true => {
                let bias = vec![0.01f32; shape.out_channels];
                let conv =
                    BlockedConv::new(isa, &weight, &bias, (shape.stride, shape.padding), true)?;
                let input = match shape.in_channels.is_multiple_of(lanes(isa)) {
                    true => InferenceInput::Blocked(Blocked::from_nchw(&x_nchw, lanes(isa))?),
                    false => InferenceInput::Nchw(
                        x_nchw.flatten_all()?.to_vec1::<f32>()?,
                        x_nchw.dims4()?,
                    ),
                };
                Some((conv, input))
            }
            false => None,
        };
        let op = Conv2dOp {
            stride: shape.stride,
            padding: shape.padding,
        };
        Ok(Self {
            shape,
            count,
            input_grad_in_training,
            op,
            x,
            dy,
            weight,
            inference,
        })
    }

    /// The three training passes (`None` for an input gradient training never computes).
    fn passes(&self) -> [Option<Call<'_>>; 3] {
        let Self {
            op, x, dy, weight, ..
        } = self;
        let forward: Call = match (x.rank(), dy.rank()) {
            (4, 5) => Box::new(move || {
                op.forward_into_blocks(x, weight, dy.dim(4)?)?;
                Ok(())
            }),
            _ => Box::new(move || {
                x.apply_op2_no_bwd(weight, op)?;
                Ok(())
            }),
        };
        let input_grad: Option<Call> = self.input_grad_in_training.then(|| {
            Box::new(move || {
                op.input_gradient(dy, weight, x.shape())?;
                Ok(())
            }) as Call
        });
        let weight_grad: Call = Box::new(move || {
            op.weight_gradient(x, dy, weight.shape())?;
            Ok(())
        });
        [Some(forward), input_grad, Some(weight_grad)]
    }

    fn inference_call(&self) -> Option<Call<'_>> {
        self.inference.as_ref().map(|(conv, input)| {
            Box::new(move || {
                conv.forward(input.source(), None)?;
                Ok(())
            }) as Call
        })
    }
}

/// The timings of every distinct shape, and the FMA peak they are shares of.
#[derive(Debug)]
pub struct ConvReport {
    pub timings: Vec<ConvTiming>,
    /// The kernel set's FMA peak in GFLOP/s, all threads: the median of one short measurement per round, taken
    /// in turn with the calls, so that a share compares a layer with the peak of the same moments of a shared
    /// machine (one peak measured apart read 117 or 232 GFLOP/s a minute apart here).
    pub peak_gflops: f64,
}

/// Times each distinct shape of `shapes` at `batch` images, `rounds` calls per pass after one warm-up, on the
/// layout training runs on: NCHW, or blocks of `blocked` channels (`ResNet::trains_blocked`; the stem then reads
/// the NCHW images and writes blocks). The algorithm of each pass is the one its last call ran.
pub fn time_convs(
    shapes: &[ConvShape],
    batch: usize,
    rounds: usize,
    blocked: Option<usize>,
) -> Result<ConvReport> {
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
    let data = distinct
        .into_iter()
        .map(|d| ShapeData::new(d, batch, blocked))
        .collect::<Result<Vec<_>>>()?;
    // Every call of every shape, with where its time goes: (shape, Some(pass) or None for the inference forward).
    let mut calls: Vec<Call> = Vec::new();
    let mut slots = Vec::new();
    for (i, d) in data.iter().enumerate() {
        for (call, pass) in d.passes().into_iter().zip(Pass::ALL) {
            if let Some(call) = call {
                calls.push(call);
                slots.push((i, Some(pass)));
            }
        }
        if let Some(call) = d.inference_call() {
            calls.push(call);
            slots.push((i, None));
        }
    }
    // One warm-up call of each, which also tells the algorithm its pass ran.
    let algorithms = slots
        .iter()
        .zip(&calls)
        .map(|(&(_, pass), call)| {
            call()?;
            Ok(pass.and_then(last_algorithm))
        })
        .collect::<Result<Vec<_>>>()?;
    // The peak takes its turn after the convolutions of each round: one chain round per thread (~10 ms).
    let isa = Isa::current();
    let mut peaks = Vec::new();
    let seconds = seconds_per_call(&calls, rounds, || {
        peaks.push(fma_peak(isa, Duration::ZERO).gflops)
    })?;
    peaks.sort_by(f64::total_cmp);
    let peak_gflops = peaks[peaks.len() / 2];
    let mut timings: Vec<ConvTiming> = data
        .iter()
        .map(|d| ConvTiming {
            shape: d.shape,
            count: d.count,
            passes: [None; 3],
            blocked: None,
        })
        .collect();
    let flops = |d: &ShapeData| 2.0 * d.shape.macs() as f64 * batch as f64;
    for ((&(i, pass), s), algorithm) in slots.iter().zip(seconds).zip(algorithms) {
        let (d, t) = (&data[i], &mut timings[i]);
        let gflops = flops(d) / s / 1e9;
        match pass {
            Some(p) => {
                t.passes[p as usize] = Some(PassTiming {
                    seconds: s,
                    gflops,
                    algorithm,
                });
            }
            None => {
                let (conv, input) = d
                    .inference
                    .as_ref()
                    .expect("an inference call has a kernel");
                t.blocked = Some(InferenceTiming {
                    seconds: s,
                    gflops,
                    algorithm: conv.algorithm(input.source()),
                });
            }
        }
    }
    Ok(ConvReport {
        timings,
        peak_gflops,
    })
}

/// A markdown table of the timings, with the total time of all the net's convolutions per pass; with a peak
/// (GFLOP/s), each pass's share of it.
/// `layout`: the training tensors' (`channel-blocked` or `NCHW`).
pub fn table(timings: &[ConvTiming], batch: usize, peak: Option<f64>, layout: &str) -> String {
    let mut out = format!(
        "| conv (batch {batch}, {layout}) | × | forward GFLOP/s | input-grad GFLOP/s | weight-grad GFLOP/s | algorithms | share of conv time | blocked inference forward GFLOP/s |\n|---|---|---|---|---|---|---|---|\n"
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
            t.blocked.map_or("–".into(), |b| match b.algorithm {
                BlockedAlgorithm::Direct => rate(b.gflops),
                BlockedAlgorithm::Winograd => format!("{} Winograd", rate(b.gflops)),
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
            .filter_map(|t| t.blocked.map(|b| t.count as f64 * b.seconds))
            .sum::<f64>()
            * 1e3;
        out += &format!(
            "all convolutions of the net, blocked inference forward: {ms:.1} ms per batch\n"
        );
    }
    out
}
