//! The shortcut path of a residual unit: options A, B and C of the paper (Sec. 3.3).

use crate::batch_norm::{batch_norm, BatchNorm};
use crate::conv::conv;
use crate::conv::Conv2d;
use crate::ops::zero_pad_shortcut::ZeroPadShortcut;
use crate::{Shortcut, Unit, WeightLayout};
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub enum ShortcutPath {
    Identity,
    /// Option A where the shape changes: subsample by `stride`, zero-pad `before`/`after` channels.
    ZeroPad {
        stride: usize,
        before: usize,
        after: usize,
    },
    /// 1×1 convolution (+ BN, except in full pre-activation units, which feed it the normalised input instead).
    Projection {
        conv: Conv2d,
        norm: Option<BatchNorm>,
    },
}

impl ShortcutPath {
    pub fn new(
        option: Shortcut,
        unit: Unit,
        (in_ch, out_ch, stride): (usize, usize, usize),
        layout: WeightLayout,
        vb: VarBuilder,
    ) -> Result<Self> {
        let reshapes = stride != 1 || in_ch != out_ch;
        let project = match option {
            Shortcut::A => false,
            Shortcut::B => reshapes,
            Shortcut::C => true,
        };
        if project {
            let (conv_name, norm_name) = layout.shortcut();
            let conv = conv(in_ch, out_ch, 1, stride, false, vb.pp(conv_name))?;
            let norm = match unit.normalizes_input() {
                false => Some(batch_norm(out_ch, false, vb.pp(norm_name))?),
                true => None,
            };
            return Ok(ShortcutPath::Projection { conv, norm });
        }
        if !reshapes {
            return Ok(ShortcutPath::Identity);
        }
        if out_ch < in_ch {
            candle_core::bail!("option-A shortcut cannot shrink {in_ch} to {out_ch} channels");
        }
        let extra = out_ch - in_ch;
        Ok(ShortcutPath::ZeroPad {
            stride,
            before: extra / 2,
            after: extra - extra / 2,
        })
    }

    /// `x` is the unit's input; `pre_activated` is BN-ReLU(x) in pre-activation units (else `x` again).
    pub fn forward_t(&self, x: &Tensor, pre_activated: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            ShortcutPath::Identity => Ok(x.clone()),
            &ShortcutPath::ZeroPad {
                stride,
                before,
                after,
            } => ZeroPadShortcut {
                stride,
                before,
                after,
            }
            .forward(x),
            ShortcutPath::Projection { conv, norm } => {
                let y = conv.forward(pre_activated)?;
                match norm {
                    Some(norm) => norm.forward_t(&y, train),
                    None => Ok(y),
                }
            }
        }
    }

    pub fn parameter_count(&self) -> usize {
        match self {
            ShortcutPath::Projection { conv, norm } => {
                conv.weight().elem_count() + norm.as_ref().map_or(0, |n| 2 * n.channels())
            }
            _ => 0,
        }
    }
}
