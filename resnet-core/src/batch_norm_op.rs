//! Training-mode BatchNorm as one op with a closed-form backward (as PyTorch's native kernel), on the CPU.
//!
//! Why not compose candle ops: the composed graph is ~15 ops with full-size temporaries, and its sums are
//! accumulated in f32 one element at a time, which loses the small per-channel gradient sums (BN biases)
//! to rounding. Here every per-channel sum is accumulated in f64.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        other => candle_core::bail!("batch-norm {what}: expected f32, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("batch-norm {what}: tensor must be contiguous"),
    }
}

/// Calls `f(channel, chunk)` for every contiguous H·W chunk of `data` (NCHW), in order.
fn chunks_of_channel(
    data: &[f32],
    channels: usize,
    plane: usize,
) -> impl Iterator<Item = (usize, &[f32])> {
    data.chunks(plane)
        .enumerate()
        .map(move |(i, chunk)| (i % channels, chunk))
}

/// Per-channel mean and biased variance of an NCHW tensor, as `[2, C]`, accumulated in f64 (no gradient).
pub struct ChannelStats;

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "batch-norm-channel-stats"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "statistics")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let count = (n * h * w) as f64;
        let mut sum = vec![0f64; c];
        for (ch, chunk) in chunks_of_channel(x, c, h * w) {
            sum[ch] += chunk.iter().map(|&v| v as f64).sum::<f64>();
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
        let mut sq = vec![0f64; c];
        for (ch, chunk) in chunks_of_channel(x, c, h * w) {
            let m = mean[ch];
            sq[ch] += chunk.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>();
        }
        let mut out: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        out.extend(sq.iter().map(|&s| (s / count) as f32));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// `y = (x − mean) · inv_std · γ + β` with the batch's statistics; arguments `(x, γ, β)`.
pub struct BatchNormTrain {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
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
        let x = contiguous_f32(s1, l1, "input")?;
        let gamma = contiguous_f32(s2, l2, "weight")?;
        let beta = contiguous_f32(s3, l3, "bias")?;
        let (_, c, h, w) = l1.shape().dims4()?;
        let mut y = Vec::with_capacity(x.len());
        for (ch, chunk) in chunks_of_channel(x, c, h * w) {
            let scale = gamma[ch] * self.inv_std[ch];
            let shift = beta[ch] - self.mean[ch] * scale;
            y.extend(chunk.iter().map(|&v| v * scale + shift));
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = gamma.dim(0)?;
        let grad_op = BatchNormTrainGrad {
            mean: self.mean.clone(),
            inv_std: self.inv_std.clone(),
        };
        let packed = x.apply_op3_no_bwd(gamma, &grad.contiguous()?, &grad_op)?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, c)?;
        let dbeta = packed.narrow(0, n + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// PyTorch's closed form, arguments `(x, γ, dy)`, output packed as `[dx (N·C·H·W), dγ (C), dβ (C)]`:
/// dβ = Σ dy, dγ = Σ dy·x̂, dx = γ·inv_std/M · (M·dy − dβ − x̂·dγ).
struct BatchNormTrainGrad {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
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
        let x = contiguous_f32(s1, l1, "backward input")?;
        let gamma = contiguous_f32(s2, l2, "backward weight")?;
        let dy = contiguous_f32(s3, l3, "backward gradient")?;
        let (n, c, h, w) = l1.shape().dims4()?;
        let plane = h * w;
        let count = (n * plane) as f64;
        let mut dbeta = vec![0f64; c];
        let mut dgamma = vec![0f64; c];
        for ((ch, xs), gs) in chunks_of_channel(x, c, plane).zip(dy.chunks(plane)) {
            let (m, inv) = (self.mean[ch] as f64, self.inv_std[ch] as f64);
            for (&xv, &gv) in xs.iter().zip(gs) {
                dbeta[ch] += gv as f64;
                dgamma[ch] += gv as f64 * (xv as f64 - m) * inv;
            }
        }
        let mut out = Vec::with_capacity(x.len() + 2 * c);
        for ((ch, xs), gs) in chunks_of_channel(x, c, plane).zip(dy.chunks(plane)) {
            let inv = self.inv_std[ch];
            let k = gamma[ch] * inv;
            let mean_dbeta = (dbeta[ch] / count) as f32;
            let mean_dgamma = (dgamma[ch] / count) as f32;
            let m = self.mean[ch];
            out.extend(
                xs.iter()
                    .zip(gs)
                    .map(|(&xv, &gv)| k * (gv - mean_dbeta - (xv - m) * inv * mean_dgamma)),
            );
        }
        out.extend(dgamma.iter().map(|&v| v as f32));
        out.extend(dbeta.iter().map(|&v| v as f32));
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}
