//! The classifier head's fully connected layer, `y = x·Wᵀ + b`, on the kernel threads: at batch 1 it is a
//! matrix-vector product whose weights (8 MB for ResNet-50's 2048 → 1000) are read once, which one thread did
//! in ~600 µs, 2 % of the forward pass (`candle_nn::Linear` runs its GEMM on one thread here: candle's
//! element-wise pool is kept to the calling thread, see `threads`).

use crate::ops::gemm::matmul;
use crate::ops::parallel::for_each_chunk;
use gemm::Parallelism;

/// Output features per task: 16 tasks for ImageNet's 1000 classes.
const ROWS_PER_TASK: usize = 64;

/// A fully connected layer's weights `[m, k]` and biases `[m]`, kept as plain vectors.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    m: usize,
    k: usize,
}

impl Linear {
    pub fn new(layer: &candle_nn::Linear) -> candle_core::Result<Self> {
        let (m, k) = layer.weight().dims2()?;
        let weight = layer.weight().flatten_all()?.to_vec1::<f32>()?;
        let bias = layer.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
        Ok(Self { weight, bias, m, k })
    }

    /// Output features (`m`).
    pub fn outputs(&self) -> usize {
        self.m
    }

    /// `[n, m]` of `x` `[n, k]`.
    pub fn forward(&self, x: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        let (m, k) = (self.m, self.k);
        if x.len() != n * k {
            candle_core::bail!("linear: {} inputs for {n} rows of {k} features", x.len());
        }
        // yᵀ `[m, n]`, a task's output rows contiguous: W's rows times xᵀ (x read with strides (1, k)).
        let mut yt = vec![0f32; m * n];
        for_each_chunk(&mut yt, ROWS_PER_TASK * n, |t, chunk| {
            let rows = chunk.len() / n.max(1);
            let w = &self.weight[t * ROWS_PER_TASK * k..][..rows * k];
            matmul(
                (rows, n, k),
                chunk,
                false,
                w,
                (k, 1),
                x,
                (1, k),
                Parallelism::None,
            );
        });
        let mut y = vec![0f32; n * m];
        for (j, row) in y.chunks_exact_mut(m.max(1)).enumerate() {
            for (o, v) in row.iter_mut().enumerate() {
                *v = yt[o * n + j] + self.bias.as_ref().map_or(0.0, |b| b[o]);
            }
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn equals_candles_linear() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (n, m, k) in [(1, 1000, 2048), (3, 10, 64), (16, 100, 70)] {
            let w = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, m, &dev)?;
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let reference = candle_nn::Linear::new(w, Some(b));
            let expected = reference.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let ours = Linear::new(&reference)?.forward(&x.flatten_all()?.to_vec1()?, n)?;
            for (a, e) in ours.iter().zip(&expected) {
                assert!(
                    (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{a} vs {e} at n {n}"
                );
            }
        }
        Ok(())
    }
}
