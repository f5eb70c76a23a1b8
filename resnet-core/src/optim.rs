//! SGD with momentum, as `torch.optim.SGD` (dampening 0):
//! `g ← ∇ + λw`; `v ← μv + g`; `w ← w − lr·v`, or with Nesterov `w ← w − lr·(g + μv)`.
//! candle-nn's SGD has no momentum. The buffers are kept by parameter name so they can be checkpointed.

use crate::ops::cpu_slice::contiguous_f32;
use crate::ops::parallel::for_each_chunk;
use crate::Result;
use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp3, Layout, Tensor, Var};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// Apply weight decay to BN parameters and biases too (PyTorch's default: yes).
    pub decay_norm_and_bias: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            nesterov: false,
            decay_norm_and_bias: true,
        }
    }
}

pub struct Sgd {
    params: Vec<(String, Var)>,
    pub config: SgdConfig,
    /// Momentum buffers by parameter name; absent until the parameter's first step (as PyTorch).
    buffers: HashMap<String, Tensor>,
}

/// BN γ/β and biases: 1-D parameters.
fn is_norm_or_bias(var: &Var) -> bool {
    var.rank() <= 1
}

impl Sgd {
    pub fn new(params: Vec<(String, Var)>, config: SgdConfig) -> Self {
        Self {
            params,
            config,
            buffers: HashMap::new(),
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// One update from `grads`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (name, var) in &self.params {
            let Some(grad) = grads.get(var) else { continue };
            // Detached: otherwise `var · decay` records the variable as an input and each momentum buffer
            // keeps the previous step's buffer (and gradient) alive through its graph — memory grew by two
            // model sizes per step (ResNet-18: ~250 MB per step).
            let (grad, param) = (grad.detach(), var.as_tensor().detach());
            let rule = UpdateRule::of(&self.config, var);
            let fused = param.device().is_cpu()
                && param.dtype() == DType::F32
                && grad.dtype() == DType::F32
                && param.is_contiguous();
            let buffer = self.buffers.get(name).cloned();
            let buffer = if fused {
                rule.apply_in_place(&param, &grad.contiguous()?, buffer)?
            } else {
                let (next, buffer) = rule.apply(&param, &grad, buffer)?;
                var.set(&next)?;
                buffer
            };
            if let Some(v) = buffer {
                self.buffers.insert(name.clone(), v);
            }
        }
        Ok(())
    }

    /// Momentum buffers for a checkpoint, under `momentum.<param name>`.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.buffers
            .iter()
            .map(|(k, v)| (format!("momentum.{k}"), v.clone()))
            .collect()
    }

    /// Restores buffers saved by [`Sgd::state`] (other names are ignored).
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.params {
            if let Some(v) = tensors.get(&format!("momentum.{name}")) {
                self.buffers.insert(
                    name.clone(),
                    v.to_device(var.device())?.to_dtype(var.dtype())?,
                );
            }
        }
        Ok(())
    }
}

/// The update of one parameter: the config's values, with the weight decay that applies to it.
#[derive(Debug, Clone, Copy)]
struct UpdateRule {
    lr: f32,
    momentum: f32,
    decay: f32,
    nesterov: bool,
}

/// Elements per parallel task of the in-place updates.
const CHUNK: usize = 1 << 15;

impl UpdateRule {
    fn of(config: &SgdConfig, var: &Var) -> Self {
        let decay = if config.decay_norm_and_bias || !is_norm_or_bias(var) {
            config.weight_decay
        } else {
            0.0
        };
        Self {
            lr: config.lr as f32,
            momentum: config.momentum as f32,
            decay: decay as f32,
            nesterov: config.nesterov,
        }
    }

    /// `g + λw`, PyTorch's `d_p` (the same f32 operations as the in-place kernels).
    fn decayed(&self, g: f32, w: f32) -> f32 {
        g + w * self.decay
    }

    /// The step from `d_p` and the new momentum buffer value.
    fn direction(&self, d: f32, v: f32) -> f32 {
        match (self.momentum != 0.0, self.nesterov) {
            (false, _) => d,
            (true, true) => d + v * self.momentum,
            (true, false) => v,
        }
    }

    /// `g + λw` with candle's ops.
    fn decayed_tensor(&self, param: &Tensor, grad: &Tensor) -> Result<Tensor> {
        Ok(match self.decay {
            0.0 => grad.clone(),
            decay => (grad + (param * decay as f64)?)?,
        })
    }

    /// With candle's ops (any device): `(new parameter, new momentum buffer)`.
    fn apply(
        &self,
        param: &Tensor,
        grad: &Tensor,
        buffer: Option<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let momentum = self.momentum as f64;
        let d = self.decayed_tensor(param, grad)?;
        if momentum == 0.0 {
            return Ok(((param - (d * self.lr as f64)?)?, None));
        }
        let v = match buffer {
            Some(v) => ((v * momentum)? + &d)?,
            None => d.clone(),
        };
        let step = if self.nesterov {
            (&d + (&v * momentum)?)?
        } else {
            v.clone()
        };
        Ok(((param - (step * self.lr as f64)?)?, Some(v)))
    }

    /// On the CPU, in place and on all threads: one pass for the momentum buffer, one for the parameter
    /// (candle's ops made five full-size temporaries per parameter on one thread: ResNet-18 has 11.7 M).
    /// Returns the momentum buffer.
    fn apply_in_place(
        &self,
        param: &Tensor,
        grad: &Tensor,
        buffer: Option<Tensor>,
    ) -> Result<Option<Tensor>> {
        let v = match (self.momentum != 0.0, buffer) {
            (false, _) => None,
            (true, Some(v)) => {
                let v = v.contiguous()?;
                v.inplace_op3(grad, param, &InPlace::Momentum(*self))?;
                Some(v)
            }
            // PyTorch starts the buffer at d_p. A compact copy of its own: the buffer is updated in place later
            // (`copy` would clone all of a view's storage).
            (true, None) => Some(self.decayed_tensor(param, grad)?.force_contiguous()?),
        };
        // With momentum the parameter's step reads the new buffer; without, the gradient stands in for it.
        param.inplace_op3(grad, v.as_ref().unwrap_or(grad), &InPlace::Parameter(*self))?;
        Ok(v)
    }
}

/// The two in-place passes of [`UpdateRule::apply_in_place`].
enum InPlace {
    /// On the buffer v, sources `(g, w)`: `v ← μv + (g + λw)`.
    Momentum(UpdateRule),
    /// On the parameter w, sources `(g, v)`: `w ← w − lr·direction(g + λw, v)`.
    Parameter(UpdateRule),
}

impl InplaceOp3 for InPlace {
    fn name(&self) -> &'static str {
        "sgd-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (a, b) = (
            contiguous_f32(s2, l2, "sgd source")?,
            contiguous_f32(s3, l3, "sgd source")?,
        );
        let dst = match (s1, l1.contiguous_offsets()) {
            (CpuStorage::F32(d), Some((start, end)))
                if end - start == a.len() && a.len() == b.len() =>
            {
                &mut d[start..end]
            }
            _ => candle_core::bail!("sgd update: expected equally long contiguous f32 tensors"),
        };
        let mut zipped = |f: &ChunkUpdate<'_>| {
            for_each_chunk(dst, CHUNK, |i, d| {
                f(d, &a[i * CHUNK..][..d.len()], &b[i * CHUNK..][..d.len()])
            })
        };
        match self {
            InPlace::Momentum(r) => zipped(&|v, g, w| {
                for ((v, &g), &w) in v.iter_mut().zip(g).zip(w) {
                    *v = *v * r.momentum + r.decayed(g, w);
                }
            }),
            InPlace::Parameter(r) => zipped(&|w, g, v| {
                for ((w, &g), &v) in w.iter_mut().zip(g).zip(v) {
                    *w -= r.direction(r.decayed(g, *w), v) * r.lr;
                }
            }),
        }
        Ok(())
    }
}

/// An update of a chunk of the destination from the same chunks of the two sources.
type ChunkUpdate<'a> = dyn Fn(&mut [f32], &[f32], &[f32]) + Sync + 'a;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A momentum buffer that recorded its inputs would keep every earlier step's buffer and gradient alive:
    /// memory grew by two model sizes per step before the buffers were detached.
    #[test]
    fn momentum_buffers_carry_no_graph() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, -2.0, 3.0], &dev)?;
        let mut sgd = Sgd::new(
            vec![("w".into(), w.clone())],
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 1e-4,
                nesterov: true,
                decay_norm_and_bias: true,
            },
        );
        for _ in 0..3 {
            let loss = (w.as_tensor() * w.as_tensor())?.sum_all()?;
            sgd.step(&loss.backward()?)?;
        }
        let state = sgd.state();
        assert_eq!(state.len(), 1);
        assert!(state.values().all(|v| !v.track_op()));
        Ok(())
    }

    /// The in-place CPU update and the candle-op update (other devices) give the same bits, with and without
    /// momentum and Nesterov, over two steps (the second one reads the momentum buffer).
    #[test]
    fn in_place_update_equals_the_candle_op_update() -> Result<()> {
        let dev = Device::Cpu;
        for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
            let rule = UpdateRule {
                lr: 0.1,
                momentum,
                decay: 1e-4,
                nesterov,
            };
            let w = Tensor::randn(0f32, 1.0, 70_000, &dev)?;
            let (mut ops_w, in_place_w) = (w.copy()?, w.copy()?);
            let (mut ops_v, mut in_place_v) = (None, None);
            for _ in 0..2 {
                let g = Tensor::randn(0f32, 1.0, 70_000, &dev)?;
                let (next, v) = rule.apply(&ops_w, &g, ops_v)?;
                (ops_w, ops_v) = (next, v);
                in_place_v = rule.apply_in_place(&in_place_w, &g, in_place_v)?;
            }
            assert_eq!(ops_w.to_vec1::<f32>()?, in_place_w.to_vec1::<f32>()?);
            assert_eq!(
                ops_v.map(|v| v.to_vec1::<f32>()).transpose()?,
                in_place_v.map(|v| v.to_vec1::<f32>()).transpose()?
            );
        }
        Ok(())
    }
}
