//! One residual unit, original or pre-activation, basic or bottleneck, with or without its shortcut.
//!
//! Original (post-activation):  y = ReLU(F(x) + shortcut(x)),  F = conv-BN-ReLU-…-conv-BN
//! Pre-activation:              y = F(x) + shortcut(x),        F = BN-ReLU-conv-…-BN-ReLU-conv
//! Plain (no shortcut):         the same layers, without the addition.

use crate::batch_norm::{batch_norm, BatchNorm};
use crate::bn_relu_conv::bn_relu_conv;
use crate::conv::Conv2d;
use crate::conv::{conv, ConvShape};
use crate::shortcut::ShortcutPath;
use crate::{Block, ResNetConfig, Unit, WeightLayout};
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct ResidualUnit {
    pub(crate) unit: Unit,
    pub(crate) convs: Vec<Conv2d>,
    /// `norms[k]` follows `convs[k]` in original units and precedes it in pre-activation units.
    pub(crate) norms: Vec<BatchNorm>,
    /// `None` in plain nets.
    pub(crate) shortcut: Option<ShortcutPath>,
}

/// `(in, out, kernel, stride)` of each convolution of the branch.
fn branch_convs(
    block: Block,
    in_ch: usize,
    width: usize,
    stride: usize,
) -> Vec<(usize, usize, usize, usize)> {
    match block {
        Block::Basic => vec![(in_ch, width, 3, stride), (width, width, 3, 1)],
        Block::Bottleneck => vec![
            (in_ch, width, 1, 1),
            (width, width, 3, stride),
            (width, width * 4, 1, 1),
        ],
    }
}

impl ResidualUnit {
    /// A unit taking `in_ch` channels to `width · expansion`, striding by `stride`.
    pub fn new(
        config: &ResNetConfig,
        in_ch: usize,
        width: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let layout = WeightLayout::of(config);
        let specs = branch_convs(config.block, in_ch, width, stride);
        let last = specs.len() - 1;
        let zero = |k: usize| config.zero_init_residual && config.residual && k == last;
        let mut convs = Vec::with_capacity(specs.len());
        let mut norms = Vec::with_capacity(specs.len());
        for (k, &(cin, cout, kernel, s)) in specs.iter().enumerate() {
            // Zero-init the branch's last affine map: the BN γ after the last conv, or that conv in pre-activation.
            let (norm_ch, zero_gamma, zero_conv) = match config.unit {
                Unit::Original => (cout, zero(k), false),
                Unit::PreActivation => (cin, false, zero(k)),
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
                vb,
            )?)
        } else {
            None
        };
        Ok(Self {
            unit: config.unit,
            convs,
            norms,
            shortcut,
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
        self.convs.iter().fold(hw, |hw, conv| {
            let shape = ConvShape::of(conv, hw);
            f(shape);
            shape.output()
        })
    }

    /// Trainable scalars of the unit (convolutions, BN affine maps, projection).
    pub fn parameter_count(&self) -> usize {
        let convs: usize = self.convs.iter().map(|c| c.weight().elem_count()).sum();
        let norms: usize = self.norms.iter().map(|n| 2 * n.channels()).sum();
        convs
            + norms
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

    // In training on the CPU, each BN-ReLU-conv runs as one op that keeps only its input for backward
    // (`bn_relu_conv`), and an original unit's last BN, the addition and the ReLU as another
    // (`BatchNorm::forward_add_relu`): a unit saves one tensor per convolution, plus its output.

    fn forward_original(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut z = self.convs[0].forward(x)?;
        for k in 1..self.convs.len() {
            z = bn_relu_conv(&self.norms[k - 1], &self.convs[k], &z, None, train)?;
        }
        let last = &self.norms[self.norms.len() - 1];
        match &self.shortcut {
            Some(shortcut) => last.forward_add_relu(&z, &shortcut.forward_t(x, x, train)?, train),
            None => last.forward_t(&z, train)?.relu(),
        }
    }

    fn forward_pre_activation(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (first, last) = (0, self.convs.len() - 1);
        // A projection shortcut reads the pre-activated input, so it is made once; otherwise the first
        // BN-ReLU-conv recomputes it in backward.
        let (mut y, shortcut) = match &self.shortcut {
            Some(projection @ ShortcutPath::Projection { .. }) => {
                let pre_activated = self.norms[first].forward_relu(x, train)?;
                let y = self.convs[first].forward(&pre_activated)?;
                (y, Some(projection.forward_t(x, &pre_activated, train)?))
            }
            shortcut => (
                bn_relu_conv(&self.norms[first], &self.convs[first], x, None, train)?,
                shortcut
                    .as_ref()
                    .map(|s| s.forward_t(x, x, train))
                    .transpose()?,
            ),
        };
        for k in first + 1..=last {
            let residual = if k == last { shortcut.as_ref() } else { None };
            y = bn_relu_conv(&self.norms[k], &self.convs[k], &y, residual, train)?;
        }
        Ok(y)
    }
}

impl ModuleT for ResidualUnit {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.unit {
            Unit::Original => self.forward_original(x, train),
            Unit::PreActivation => self.forward_pre_activation(x, train),
        }
    }
}
