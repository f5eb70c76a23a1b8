//! How a residual unit joins its shortcut h(x) and its branch F(x): the sum, or one of the shortcut variants of
//! Identity Mappings Fig. 2 (constant scaling, exclusive and shortcut-only gating, dropout on the shortcut).

use crate::conv::{conv, Conv2d};
use crate::ops::dropout_mask::{keep_mask, key};
use crate::Combine;
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What makes a shortcut-dropout mask, shared by the units of one network: the model's seed and the training
/// step. A mask is a function of (seed, unit, step) alone, so the same seed gives the same masks whatever the
/// thread count, recomputation draws the same mask again within a step, and a resumed run the masks of an
/// uninterrupted one.
#[derive(Debug, Default)]
pub struct DropoutDraws {
    seed: AtomicU64,
    step: AtomicU64,
}

impl DropoutDraws {
    pub fn set_seed(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
    }

    /// The step whose masks the next training-mode forwards use.
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    fn key(&self, unit: u64) -> u64 {
        key(&[
            self.seed.load(Ordering::Relaxed),
            unit,
            self.step.load(Ordering::Relaxed),
        ])
    }
}

#[derive(Debug, Clone)]
pub enum Join {
    Sum,
    Scaled {
        shortcut: f64,
        branch: f64,
    },
    /// g(x) = σ(gate(x) + bias); `exclusive`: (1 − g)·h + g·F, else (1 − g)·h + F.
    Gated {
        gate: Conv2d,
        bias: Tensor,
        exclusive: bool,
    },
    Dropout {
        rate: f64,
        draws: Arc<DropoutDraws>,
        /// The unit's index in the network, which keeps the masks of two units apart.
        unit: u64,
    },
}

impl Join {
    /// The join of a unit taking `in_ch` channels to `out_ch`, striding by `stride`; a gate is built under `vb`.
    pub fn new(
        combine: Combine,
        (in_ch, out_ch, stride): (usize, usize, usize),
        (draws, unit): (&Arc<DropoutDraws>, u64),
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(match combine {
            Combine::Sum => Join::Sum,
            Combine::ConstantScaling { shortcut, branch } => Join::Scaled { shortcut, branch },
            Combine::ExclusiveGating { gate_bias } | Combine::ShortcutOnlyGating { gate_bias } => {
                Join::Gated {
                    gate: conv(in_ch, out_ch, 1, stride, false, vb.clone())?,
                    bias: vb.get_with_hints(out_ch, "bias", Init::Const(gate_bias))?,
                    exclusive: matches!(combine, Combine::ExclusiveGating { .. }),
                }
            }
            Combine::DropoutShortcut { rate } => Join::Dropout {
                rate,
                draws: draws.clone(),
                unit,
            },
        })
    }

    /// h + F in this mode: the fused add paths of the units apply.
    pub fn is_sum(&self, train: bool) -> bool {
        match self {
            Join::Sum => true,
            Join::Dropout { .. } => !train,
            _ => false,
        }
    }

    /// The join of the shortcut `h` and the branch `f`; `x` is the unit's input (what a gate reads).
    pub fn forward_t(&self, x: &Tensor, h: &Tensor, f: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Join::Sum => h + f,
            Join::Dropout { .. } if !train => h + f,
            Join::Dropout { rate, draws, unit } => {
                let mask = keep_mask(h.elem_count(), *rate, draws.key(*unit));
                let mask = Tensor::from_vec(mask, h.shape(), &Device::Cpu)?
                    .to_dtype(h.dtype())?
                    .to_device(h.device())?;
                (h * mask)? + f
            }
            &Join::Scaled { shortcut, branch } => {
                h.affine(shortcut, 0.0)? + f.affine(branch, 0.0)?
            }
            Join::Gated {
                gate,
                bias,
                exclusive,
            } => {
                let z = gate
                    .forward(x)?
                    .broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
                let g = candle_nn::ops::sigmoid(&z)?;
                match exclusive {
                    true => h + (g * (f - h)?)?,
                    false => (h * g.affine(-1.0, 1.0)?)? + f,
                }
            }
        }
    }

    /// The gate's convolution, where there is one.
    pub fn gate(&self) -> Option<&Conv2d> {
        match self {
            Join::Gated { gate, .. } => Some(gate),
            _ => None,
        }
    }

    pub fn parameter_count(&self) -> usize {
        match self {
            Join::Gated { gate, bias, .. } => gate.weight().elem_count() + bias.elem_count(),
            _ => 0,
        }
    }
}
