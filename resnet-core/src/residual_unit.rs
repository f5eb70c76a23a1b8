//! One residual unit: any activation placement of Identity Mappings Fig. 4 (original and full pre-activation
//! among them), single-conv, basic or bottleneck branch, with or without its shortcut, joined by any of Fig. 2.
//!
//! Original (post-activation):  y = ReLU(F(x) + h(x)),   F = conv-BN-ReLU-…-conv-BN
//! BN after addition:           y = ReLU(BN(F(x) + h(x))), F = conv-BN-ReLU-…-conv
//! ReLU before addition:        y = F(x) + h(x),         F = conv-BN-ReLU-…-conv-BN-ReLU
//! ReLU-only pre-activation:    y = F(x) + h(x),         F = ReLU-conv-BN-…-ReLU-conv-BN
//! Pre-activation:              y = F(x) + h(x),         F = BN-ReLU-conv-…-BN-ReLU-conv
//! Plain (no shortcut):         the same layers, without the addition.
//! A variant of Fig. 2 replaces the addition `+` by its join (`combine::Join`).

use crate::batch_norm::{batch_norm, BatchNorm};
use crate::bn_relu_conv::bn_relu_conv;
use crate::combine::{DropoutDraws, Join};
use crate::conv::Conv2d;
use crate::conv::{conv, ConvShape};
use crate::shortcut::ShortcutPath;
use crate::{Block, ResNetConfig, Unit, WeightLayout};
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ResidualUnit {
    pub(crate) unit: Unit,
    pub(crate) convs: Vec<Conv2d>,
    /// `norms[k]` follows `convs[k]` in original units and precedes it in pre-activation units.
    pub(crate) norms: Vec<BatchNorm>,
    /// `None` in plain nets.
    pub(crate) shortcut: Option<ShortcutPath>,
    pub(crate) join: Join,
}

/// `(in, out, kernel, stride)` of each convolution of the branch.
fn branch_convs(
    block: Block,
    in_ch: usize,
    width: usize,
    stride: usize,
) -> Vec<(usize, usize, usize, usize)> {
    match block {
        Block::Single => vec![(in_ch, width, 3, stride)],
        Block::Basic => vec![(in_ch, width, 3, stride), (width, width, 3, 1)],
        Block::Bottleneck => vec![
            (in_ch, width, 1, 1),
            (width, width, 3, stride),
            (width, width * 4, 1, 1),
        ],
    }
}

impl ResidualUnit {
    /// A unit taking `in_ch` channels to `width · expansion`, striding by `stride`; `draws` makes the masks of
    /// a dropout shortcut, `index` is the unit's place in the network.
    pub fn new(
        config: &ResNetConfig,
        (in_ch, width, stride): (usize, usize, usize),
        (draws, index): (&Arc<DropoutDraws>, u64),
        vb: VarBuilder,
    ) -> Result<Self> {
        let layout = WeightLayout::of(config);
        let specs = branch_convs(config.block, in_ch, width, stride);
        let last = specs.len() - 1;
        let zero = |k: usize| config.zero_init_residual && config.residual && k == last;
        let mut convs = Vec::with_capacity(specs.len());
        let mut norms = Vec::with_capacity(specs.len());
        for (k, &(cin, cout, kernel, s)) in specs.iter().enumerate() {
            // Zero-init the branch's last affine map: the BN γ after the last conv, or the last conv itself where
            // no BN follows it inside the branch (pre-activation, BN after addition).
            let (norm_ch, zero_gamma, zero_conv) = match config.unit {
                Unit::PreActivation => (cin, false, zero(k)),
                Unit::BnAfterAddition => (cout, false, zero(k)),
                _ => (cout, zero(k), false),
            };
            convs.push(conv(
                cin,
                cout,
                kernel,
                s,
                zero_conv,
                vb.pp(layout.branch_conv(k + 1)),
            )?);
            norms.push(batch_norm(
                norm_ch,
                zero_gamma,
                vb.pp(layout.branch_norm(k + 1)),
            )?);
        }
        let out_ch = width * config.block.expansion();
        let shortcut = if config.residual {
            Some(ShortcutPath::new(
                config.shortcut,
                config.unit,
                (in_ch, out_ch, stride),
                layout,
                vb.clone(),
            )?)
        } else {
            None
        };
        let join = Join::new(
            config.combine,
            (in_ch, out_ch, stride),
            (draws, index),
            vb.pp(layout.gate()),
        )?;
        Ok(Self {
            unit: config.unit,
            convs,
            norms,
            shortcut,
            join,
        })
    }

    /// Multiply-adds on an `h`×`w` input, and the output size.
    pub fn macs(&self, hw: (usize, usize)) -> (u64, (usize, usize)) {
        let mut total = 0;
        let out = self.visit_convs(hw, &mut |shape| total += shape.macs());
        (total, out)
    }

    /// Calls `f` with the shape of every convolution of the unit (shortcut first) on an `h`×`w` input;
    /// returns the output size.
    pub fn visit_convs(&self, hw: (usize, usize), f: &mut dyn FnMut(ConvShape)) -> (usize, usize) {
        if let Some(ShortcutPath::Projection { conv, .. }) = &self.shortcut {
            f(ConvShape::of(conv, hw));
        }
        if let Some(gate) = self.join.gate() {
            f(ConvShape::of(gate, hw));
        }
        self.convs.iter().fold(hw, |hw, conv| {
            let shape = ConvShape::of(conv, hw);
            f(shape);
            shape.output()
        })
    }

    /// Trainable scalars of the unit (convolutions, BN affine maps, projection, gate).
    pub fn parameter_count(&self) -> usize {
        let convs: usize = self.convs.iter().map(|c| c.weight().elem_count()).sum();
        let norms: usize = self.norms.iter().map(|n| 2 * n.channels()).sum();
        convs
            + norms
            + self.join.parameter_count()
            + self
                .shortcut
                .as_ref()
                .map_or(0, ShortcutPath::parameter_count)
    }

    /// Channels out of the unit.
    pub fn out_channels(&self) -> usize {
        self.convs
            .last()
            .map_or(0, |c| c.weight().dim(0).unwrap_or(0))
    }

    /// Whether a training pass through this unit reads and writes nothing but its convolutions, BNs, shortcut
    /// (identity, option A, or a projection: a 1×1 convolution and its BN) and plain sum: what the
    /// channel-blocked layout covers (`ops::channel_blocks`).
    pub(crate) fn keeps_channel_blocks(&self, train: bool) -> bool {
        self.unit == Unit::Original
            && match &self.shortcut {
                None => true,
                Some(ShortcutPath::Projection { norm, .. }) => {
                    norm.is_some() && self.join.is_sum(train)
                }
                Some(_) => self.join.is_sum(train),
            }
    }

    // In training on the CPU, each BN-ReLU-conv runs as one op that keeps only its input for backward
    // (`bn_relu_conv`), and an original unit's last BN, the addition and the ReLU as another
    // (`BatchNorm::forward_add_relu`): a unit saves one tensor per convolution, plus its output.

    /// The branch of a unit whose BNs follow their convolutions, up to its last convolution's output.
    fn branch_to_last_conv(&self, input: &Tensor, train: bool) -> Result<Tensor> {
        let mut z = self.convs[0].forward(input)?;
        for k in 1..self.convs.len() {
            z = bn_relu_conv(&self.norms[k - 1], &self.convs[k], &z, None, train)?;
        }
        Ok(z)
    }

    /// The units whose BNs follow their convolutions: every placement but full pre-activation.
    fn forward_post_normalized(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // ReLU-only pre-activation: the branch (and a projection shortcut) read ReLU(x).
        let activated = match self.unit {
            Unit::ReluOnlyPreActivation => x.relu()?,
            _ => x.clone(),
        };
        let z = self.branch_to_last_conv(&activated, train)?;
        let h = self
            .shortcut
            .as_ref()
            .map(|s| s.forward_t(x, &activated, train))
            .transpose()?;
        let join = |f: Tensor| match &h {
            Some(h) => self.join.forward_t(x, h, &f, train),
            None => Ok(f),
        };
        let last = &self.norms[self.norms.len() - 1];
        match self.unit {
            Unit::Original => match &h {
                Some(h) if self.join.is_sum(train) => last.forward_add_relu(&z, h, train),
                _ => join(last.forward_t(&z, train)?)?.relu(),
            },
            Unit::BnAfterAddition => last.forward_relu(&join(z)?, train),
            Unit::ReluBeforeAddition => join(last.forward_relu(&z, train)?),
            Unit::ReluOnlyPreActivation | Unit::PreActivation => join(last.forward_t(&z, train)?),
        }
    }

    fn forward_pre_activation(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // A projection shortcut reads the pre-activated input, so it is made once; otherwise the first
        // BN-ReLU-conv recomputes it in backward.
        let pre_activated = match &self.shortcut {
            Some(ShortcutPath::Projection { .. }) => Some(self.norms[0].forward_relu(x, train)?),
            _ => None,
        };
        let mut pending = self
            .shortcut
            .as_ref()
            .map(|s| s.forward_t(x, pre_activated.as_ref().unwrap_or(x), train))
            .transpose()?;
        let last = self.convs.len() - 1;
        let mut y = x.clone();
        for k in 0..=last {
            // A plain sum is added in the last convolution's output pass.
            let residual = match k == last && self.join.is_sum(train) {
                true => pending.take(),
                false => None,
            };
            y = match (k, &pre_activated) {
                (0, Some(pre_activated)) => {
                    let y = self.convs[0].forward(pre_activated)?;
                    match &residual {
                        Some(r) => (y + r)?,
                        None => y,
                    }
                }
                _ => bn_relu_conv(&self.norms[k], &self.convs[k], &y, residual.as_ref(), train)?,
            };
        }
        match pending {
            Some(h) => self.join.forward_t(x, &h, &y, train),
            None => Ok(y),
        }
    }
}

impl ModuleT for ResidualUnit {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.unit {
            Unit::PreActivation => self.forward_pre_activation(x, train),
            _ => self.forward_post_normalized(x, train),
        }
    }
}
