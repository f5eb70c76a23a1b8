//! Training-mode BatchNorm (optionally followed by ReLU) as one op with a closed-form backward, as PyTorch's
//! native kernel, on the CPU; threaded over planes (the sums over fixed groups of images).
//!
//! Why not compose candle ops: the composed graph is ~15 ops with full-size temporaries, and its sums are
//! accumulated in f32 one element at a time, which loses the small per-channel gradient sums (BN biases)
//! to rounding. Here every per-channel sum is accumulated in f64, in a fixed order, in `LANES` independent
//! partial sums (so the loops vectorise instead of waiting on one accumulator).

use crate::ops::add_relu::relu_mask;
use crate::ops::batch_norm_kernels::{self as kernels, Chunk, GradientParams, LaneArray, LANES};
use crate::ops::cpu_slice::{contiguous_f32, written_by};
use crate::ops::isa::Isa;
use crate::ops::parallel::{for_each_chunk, map_indices};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;
use std::sync::Mutex;

/// Terms per f32 partial sum before it is added into f64 (rounding ~√n·ε of the partial).
const TERMS_PER_LANE: usize = 1024;

/// Image groups of a batch at least (where it has that many images): the work the threads share.
const MIN_GROUPS: usize = 16;

/// Where each element's channel is: NCHW `[N, C, H, W]` (`lanes` 1) or channel-blocked `[N, C/B, H, W, B]`
/// (`lanes` B, training on blocked tensors: see `ops::conv`). The elements run in chunks of `plane · lanes`, one
/// per image and block of `lanes` channels; element `j` of chunk `i` is channel `(i mod C/lanes)·lanes + j mod
/// lanes`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Channels {
    pub n: usize,
    pub c: usize,
    pub plane: usize,
    pub lanes: usize,
}

impl Channels {
    pub fn of(shape: &Shape) -> Result<Self> {
        Ok(match *shape.dims() {
            [n, blocks, h, w, lanes @ (8 | 16)] => Channels {
                n,
                c: blocks * lanes,
                plane: h * w,
                lanes,
            },
            _ => {
                let (n, c, h, w) = shape.dims4()?;
                Channels {
                    n,
                    c,
                    plane: h * w,
                    lanes: 1,
                }
            }
        })
    }

    fn chunk(&self) -> usize {
        self.plane * self.lanes
    }

    /// The first of the `lanes` channels of chunk `i`.
    fn first_channel(&self, i: usize) -> usize {
        i % (self.c / self.lanes) * self.lanes
    }

    /// Values per channel.
    pub fn count(&self) -> usize {
        self.n * self.plane
    }

    /// `per_channel[ch]` for the `lanes` channels of chunk `i`, at the front of a lane array.
    fn lane_values(&self, i: usize, per_channel: &[f32]) -> LaneArray {
        let first = self.first_channel(i);
        // Whole copies of the block's values (lanes divide LANES), not a division per lane: ~1 % of a
        // ResNet-18 training step in `perf`, where every chunk is one NCHW plane.
        let mut values = [0f32; LANES];
        for copy in values.chunks_exact_mut(self.lanes) {
            copy.copy_from_slice(&per_channel[first..first + self.lanes]);
        }
        values
    }
}

/// The two sums per channel of a [`channel_sums`] pass.
#[derive(Clone, Copy)]
enum Sums {
    /// `(Σ d, Σ d²)`, `d = x − params[ch]` (the shift).
    Statistics,
    /// `(Σ g·(x − params[ch]), Σ g)` (the mean), `g = dy` masked by the ReLU's output `y` where `relu`.
    Gradient { relu: bool },
}

/// Per channel `(Σ a, Σ b)` of `sums` over `(x, dy, y)` laid out as `dims` (equally long slices; the statistics
/// read only `x`).
///
/// The batch is read in order, in fixed groups of images, each group summing every channel into `LANES` f32
/// partial sums per reduction (at most [`TERMS_PER_LANE`] terms each, or one plane's share where a plane is
/// larger), then into f64; the groups' sums are added in group order. So the sums do not depend on the thread
/// count, and each thread streams whole images:
/// going channel by channel instead read one plane per image (4 KB at 32×32, one page, which the hardware
/// prefetchers do not run past) and ran at ~16 GB/s (statistics of `[128, 16, 32, 32]` 0.51 → 0.20 ms, AMD EPYC
/// Zen 4).
fn channel_sums(
    (x, g, y): (&[f32], &[f32], &[f32]),
    dims: Channels,
    params: &[f32],
    sums: Sums,
) -> Vec<(f64, f64)> {
    let isa = Isa::current();
    let (n, c, chunk) = (dims.n, dims.c, dims.chunk());
    let blocks = c / dims.lanes;
    let (g, y) = (&g[..x.len()], &y[..x.len()]);
    let per_group = (TERMS_PER_LANE * LANES / chunk.max(1)).clamp(1, n.div_ceil(MIN_GROUPS).max(1));
    let group_sums = |group: usize| {
        // Per block: lane `l` sums channel `block·lanes + l mod lanes`.
        let mut lanes = vec![([0f32; LANES], [0f32; LANES]); blocks];
        for img in group * per_group..((group + 1) * per_group).min(n) {
            for (block, (a, b)) in lanes.iter_mut().enumerate() {
                let i = img * blocks + block;
                let span = i * chunk..(i + 1) * chunk;
                let params = &dims.lane_values(i, params);
                let chunk = match sums {
                    Sums::Statistics => Chunk::Statistics {
                        x: &x[span],
                        shift: params,
                        sums: (a, b),
                    },
                    Sums::Gradient { relu } => Chunk::GradientSums {
                        xgy: (&x[span.clone()], &g[span.clone()], &y[span]),
                        mean: params,
                        relu,
                        sums: (a, b),
                    },
                };
                kernels::run(isa, chunk);
            }
        }
        let total = |v: &[f32; LANES], lane: usize| {
            v.iter()
                .skip(lane)
                .step_by(dims.lanes)
                .map(|&s| s as f64)
                .sum::<f64>()
        };
        (0..c)
            .map(|ch| {
                let (a, b) = &lanes[ch / dims.lanes];
                (total(a, ch % dims.lanes), total(b, ch % dims.lanes))
            })
            .collect::<Vec<_>>()
    };
    let groups: Vec<Vec<(f64, f64)>> = map_indices(n.div_ceil(per_group), group_sums);
    let mut sums = vec![(0f64, 0f64); c];
    for group in groups {
        for (s, (a, b)) in sums.iter_mut().zip(group) {
            *s = (s.0 + a, s.1 + b);
        }
    }
    sums
}

/// Per-channel mean and biased variance of an NCHW tensor, as `[2, C]`, accumulated in f64 (no gradient).
pub struct ChannelStats;

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "batch-norm-channel-stats"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "batch-norm statistics")?;
        let dims = Channels::of(layout.shape())?;
        let (c, count) = (dims.c, dims.count() as f64);
        // One pass over x − s, s = the channel's first value (a shift near the mean keeps Σ(x−s)²/M − (mean−s)²
        // free of cancellation).
        let shifts: Vec<f32> = (0..c)
            .map(|ch| {
                let (block, lane) = (ch / dims.lanes, ch % dims.lanes);
                x.get(block * dims.chunk() + lane).copied().unwrap_or(0.0)
            })
            .collect();
        let sums = channel_sums((x, x, x), dims, &shifts, Sums::Statistics);
        let stats: Vec<(f32, f32)> = sums
            .iter()
            .zip(&shifts)
            .map(|(&(sum, sq), &shift)| {
                let centre = sum / count;
                let var = (sq / count - centre * centre).max(0.0);
                ((shift as f64 + centre) as f32, var as f32)
            })
            .collect();
        let mut out: Vec<f32> = stats.iter().map(|s| s.0).collect();
        out.extend(stats.iter().map(|s| s.1));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// `y = (x − mean) · inv_std · γ + β` with the batch's statistics, then ReLU if `relu`; arguments `(x, γ, β)`.
#[derive(Debug, Clone)]
pub struct BatchNormTrain {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    pub relu: bool,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self.normalize(
            l1.shape(),
            contiguous_f32(s1, l1, "batch-norm input")?,
            contiguous_f32(s2, l2, "batch-norm weight")?,
            contiguous_f32(s3, l3, "batch-norm bias")?,
            None,
        )?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dgamma_dbeta) = self.gradients(x, gamma, y, grad)?;
        let c = gamma.dim(0)?;
        let dgamma = dgamma_dbeta.narrow(0, 0, c)?;
        let dbeta = dgamma_dbeta.narrow(0, c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

impl BatchNormTrain {
    /// `ReLU?((x − mean) · inv_std · γ + β (+ residual))` of an NCHW tensor of `shape`, plane by plane.
    /// The residual is added after the affine map and before the ReLU: the roundings of a separate add.
    pub(crate) fn normalize(
        &self,
        shape: &Shape,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        residual: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let dims = Channels::of(shape)?;
        let c = dims.c;
        if gamma.len() != c || beta.len() != c || residual.is_some_and(|r| r.len() != x.len()) {
            candle_core::bail!(
                "batch-norm over {} channels got input {shape:?} (residual of {:?} values)",
                gamma.len(),
                residual.map(<[f32]>::len)
            );
        }
        let chunk = dims.chunk();
        let floor = if self.relu { 0.0 } else { f32::NEG_INFINITY };
        let scales: Vec<f32> = (0..c).map(|ch| gamma[ch] * self.inv_std[ch]).collect();
        let shifts: Vec<f32> = (0..c)
            .map(|ch| beta[ch] - self.mean[ch] * scales[ch])
            .collect();
        let isa = Isa::current();
        let fill = |y: &mut [MaybeUninit<f32>]| {
            for_each_chunk(y, chunk, |i, out| {
                let chunk = Chunk::Normalize {
                    x: &x[i * chunk..(i + 1) * chunk],
                    residual: residual.map(|r| &r[i * chunk..(i + 1) * chunk]),
                    out,
                    scale: &dims.lane_values(i, &scales),
                    shift: &dims.lane_values(i, &shifts),
                    floor,
                };
                kernels::run(isa, chunk);
            });
        };
        // SAFETY: the planes cover y and every element is written.
        Ok(unsafe { written_by(x.len(), fill) })
    }

    /// `(dx, [dγ; dβ])` from the input `x`, γ, the output `y` and its gradient `dy` (`y` gives the ReLU's mask,
    /// so a following residual add + ReLU is differentiated too when `y` is the unit's output).
    /// The two sums come back as one compact `[2C]` tensor.
    pub(crate) fn gradients(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let c = gamma.dim(0)?;
        let grad_op = BatchNormTrainGrad {
            mean: self.mean.clone(),
            inv_std: self.inv_std.clone(),
            gamma: gamma.to_vec1()?,
            relu: self.relu,
            sums: Mutex::new(Vec::new()),
        };
        let dx = x.apply_op3_no_bwd(&dy.contiguous()?, y, &grad_op)?;
        let sums = grad_op.sums.into_inner().unwrap_or_else(|e| e.into_inner());
        let sums: Vec<f32> = sums
            .iter()
            .map(|s| s.0 as f32)
            .chain(sums.iter().map(|s| s.1 as f32))
            .collect();
        if sums.len() != 2 * c {
            candle_core::bail!("batch-norm backward: {} sums for {c} channels", sums.len());
        }
        Ok((dx, Tensor::new(sums, x.device())?))
    }
}

/// `ReLU(BN(x) + s)` in training, arguments `(x, [γ; β], s)`: the end of an original residual unit as one pass.
/// Backward needs only `x` and the output (its sign is the ReLU's mask), not the BN output.
pub struct BatchNormAddRelu {
    /// The batch statistics; `relu` is true.
    pub stats: BatchNormTrain,
}

impl CustomOp3 for BatchNormAddRelu {
    fn name(&self) -> &'static str {
        "batch-norm-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let affine = contiguous_f32(s2, l2, "batch-norm weight and bias")?;
        let (gamma, beta) = affine.split_at(affine.len() / 2);
        let y = self.stats.normalize(
            l1.shape(),
            contiguous_f32(s1, l1, "batch-norm input")?,
            gamma,
            beta,
            Some(contiguous_f32(s3, l3, "residual")?),
        )?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        affine: &Tensor,
        _shortcut: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gamma = affine.narrow(0, 0, affine.dim(0)? / 2)?;
        let (dx, dgamma_dbeta) = self.stats.gradients(x, &gamma, out, grad)?;
        let dshortcut = relu_mask(&grad.contiguous()?, out)?;
        Ok((Some(dx), Some(dgamma_dbeta), Some(dshortcut)))
    }
}

/// PyTorch's closed form, arguments `(x, dy, y)`, output dx; the per-channel `(dγ, dβ)` are left in `sums`:
/// g = dy·[y > 0] with ReLU (else dy); dβ = Σ g, dγ = Σ g·x̂, dx = γ·inv_std/M · (M·g − dβ − x̂·dγ).
/// (dx is a tensor of its own, exactly the input's size: packed with the sums it was a slightly larger buffer
/// than every activation, which the allocator could not fill with them afterwards.)
struct BatchNormTrainGrad {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    gamma: Vec<f32>,
    relu: bool,
    sums: Mutex<Vec<(f64, f64)>>,
}

impl CustomOp3 for BatchNormTrainGrad {
    fn name(&self) -> &'static str {
        "batch-norm-train-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "batch-norm backward input")?;
        let dy = contiguous_f32(s2, l2, "batch-norm backward gradient")?;
        let y = contiguous_f32(s3, l3, "batch-norm backward output")?;
        let dims = Channels::of(l1.shape())?;
        let (c, chunk, count) = (dims.c, dims.chunk(), dims.count() as f64);
        // (Σ g·(x − mean), Σ g), then dγ = inv_std · the first.
        let relu = self.relu;
        let sums = channel_sums((x, dy, y), dims, &self.mean, Sums::Gradient { relu });
        let sums: Vec<(f64, f64)> = sums
            .iter()
            .zip(&self.inv_std)
            .map(|(&(gx, g), &inv)| (gx * inv as f64, g))
            .collect();
        let per_channel = |f: &dyn Fn(usize) -> f32| (0..c).map(f).collect::<Vec<f32>>();
        let k = per_channel(&|ch| self.gamma[ch] * self.inv_std[ch]);
        let mean_dgamma = per_channel(&|ch| (sums[ch].0 / count) as f32);
        let mean_dbeta = per_channel(&|ch| (sums[ch].1 / count) as f32);
        let isa = Isa::current();
        let fill = |dx: &mut [MaybeUninit<f32>]| {
            for_each_chunk(dx, chunk, |i, out| {
                let lanes = |v: &[f32]| dims.lane_values(i, v);
                let params = GradientParams {
                    k: lanes(&k),
                    inv_std: lanes(&self.inv_std),
                    mean: lanes(&self.mean),
                    mean_dgamma: lanes(&mean_dgamma),
                    mean_dbeta: lanes(&mean_dbeta),
                };
                let span = i * chunk..(i + 1) * chunk;
                let chunk = Chunk::InputGradient {
                    xgy: (&x[span.clone()], &dy[span.clone()], &y[span]),
                    out,
                    params: &params,
                    relu,
                };
                kernels::run(isa, chunk);
            });
        };
        // SAFETY: the planes cover dx.
        let dx = unsafe { written_by(x.len(), fill) };
        *self.sums.lock().unwrap_or_else(|e| e.into_inner()) = sums;
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
