//! The whole network: stem, stages of residual units, (final BN-ReLU), global average pool, classifier.

use crate::batch_norm::{batch_norm, BatchNorm};
use crate::combine::DropoutDraws;
use crate::conv::Conv2d;
use crate::conv::{conv, conv_macs, ConvShape};
use crate::ops::blocked;
use crate::ops::channel_blocks;
use crate::ops::conv::Conv2dOp;
use crate::ops::isa::Isa;
use crate::ops::max_pool::MaxPool2d;
use crate::residual_unit::ResidualUnit;
use crate::{Family, ResNetConfig, Unit, WeightLayout};
use candle_core::{DType, Module, ModuleT, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use std::ops::Range;
use std::sync::Arc;

/// A row of [`ResNet::layers`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerSummary {
    pub name: String,
    /// `(channels, height, width)` of the output.
    pub output: (usize, usize, usize),
    pub params: usize,
    pub macs: u64,
}

#[derive(Debug, Clone)]
pub struct ResNet {
    pub(crate) config: ResNetConfig,
    pub(crate) stem_conv: Conv2d,
    /// BN after the stem conv (every placement but full pre-activation), with a ReLU where `unit.stem_relu()`.
    pub(crate) stem_norm: Option<BatchNorm>,
    pub(crate) stem_pool: Option<MaxPool2d>,
    pub(crate) units: Vec<ResidualUnit>,
    /// BN-ReLU after the last unit (full pre-activation only).
    pub(crate) final_norm: Option<BatchNorm>,
    pub(crate) head: Linear,
    /// The seed and step of the dropout-shortcut masks (see [`DropoutDraws`]).
    pub(crate) draws: Arc<DropoutDraws>,
}

impl ResNet {
    pub fn new(config: &ResNetConfig, vb: VarBuilder) -> crate::Result<Self> {
        config.validate()?;
        let layout = WeightLayout::of(config);
        let (stem_width, stem_kernel, stem_stride, stem_pool) = match config.family {
            Family::Cifar => (config.base_width, 3, 1, None),
            Family::ImageNet => (config.base_width, 7, 2, Some(MaxPool2d::STEM)),
        };
        let stem_conv = conv(
            3,
            stem_width,
            stem_kernel,
            stem_stride,
            false,
            vb.pp(layout.stem_conv()),
        )?;
        let pre_activation = config.unit.normalizes_input();
        let stem_norm = match pre_activation {
            false => Some(batch_norm(stem_width, false, vb.pp(layout.stem_norm()))?),
            true => None,
        };

        let draws = Arc::new(DropoutDraws::default());
        let mut units = Vec::new();
        let mut in_ch = stem_width;
        for (stage, (&depth, width)) in config
            .stage_depths
            .iter()
            .zip(config.stage_widths())
            .enumerate()
        {
            for index in 0..depth {
                let stride = if index == 0 && stage > 0 { 2 } else { 1 };
                let vb_unit = vb.pp(layout.unit(stage, index));
                let place = (&draws, units.len() as u64);
                units.push(ResidualUnit::new(
                    config,
                    (in_ch, width, stride),
                    place,
                    vb_unit,
                )?);
                in_ch = width * config.block.expansion();
            }
        }

        let features = config.feature_width();
        let final_norm = match pre_activation {
            true => Some(batch_norm(features, false, vb.pp(layout.final_norm()))?),
            false => None,
        };
        let head = head(features, config.num_classes, layout, vb.pp(layout.head()))?;
        Ok(Self {
            config: config.clone(),
            stem_conv,
            stem_norm,
            stem_pool,
            units,
            final_norm,
            head,
            draws,
        })
    }

    /// The seed and step of the dropout-shortcut masks.
    pub fn dropout_draws(&self) -> &DropoutDraws {
        &self.draws
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Multiply-adds of one image of `h`×`w` pixels (convolutions and the classifier, as the papers count).
    pub fn macs(&self, hw: (usize, usize)) -> u64 {
        self.layers(hw).iter().map(|l| l.macs).sum()
    }

    /// One row per stem, residual unit and head: output shape, parameters and multiply-adds for an `h`×`w` input.
    pub fn layers(&self, hw: (usize, usize)) -> Vec<LayerSummary> {
        let layout = WeightLayout::of(&self.config);
        let mut rows = Vec::with_capacity(self.units.len() + 2);
        let (stem_macs, mut hw) = conv_macs(&self.stem_conv, hw);
        if let Some(pool) = self.stem_pool {
            hw = (pool.output_size(hw.0), pool.output_size(hw.1));
        }
        let stem_ch = self.stem_conv.weight().dim(0).unwrap_or(0);
        rows.push(LayerSummary {
            name: "stem".into(),
            output: (stem_ch, hw.0, hw.1),
            params: self.stem_conv.weight().elem_count()
                + self.stem_norm.as_ref().map_or(0, |n| 2 * n.channels()),
            macs: stem_macs,
        });
        let mut names = self
            .config
            .stage_depths
            .iter()
            .enumerate()
            .flat_map(|(s, &d)| (0..d).map(move |i| (s, i)));
        for unit in &self.units {
            let (macs, out) = unit.macs(hw);
            hw = out;
            let (s, i) = names.next().unwrap_or_default();
            rows.push(LayerSummary {
                name: layout.unit(s, i),
                output: (unit.out_channels(), hw.0, hw.1),
                params: unit.parameter_count(),
                macs,
            });
        }
        let features = self.config.feature_width();
        rows.push(LayerSummary {
            name: layout.head().into(),
            output: (self.config.num_classes, 1, 1),
            params: self.final_norm.as_ref().map_or(0, |n| 2 * n.channels())
                + (features + 1) * self.config.num_classes,
            macs: (features * self.config.num_classes) as u64,
        });
        rows
    }

    /// The shape of every convolution applied to an `h`×`w` input, in order (stem, then each unit's
    /// shortcut projection and branch).
    pub fn conv_shapes(&self, hw: (usize, usize)) -> Vec<ConvShape> {
        let stem = ConvShape::of(&self.stem_conv, hw);
        let mut shapes = vec![stem];
        let mut hw = stem.output();
        if let Some(pool) = self.stem_pool {
            hw = (pool.output_size(hw.0), pool.output_size(hw.1));
        }
        for unit in &self.units {
            hw = unit.visit_convs(hw, &mut |s| shapes.push(s));
        }
        shapes
    }

    /// Pooled features `[N, C]` before the classifier.
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.stem_t(x, train)?;
        self.pooled_t(&self.units_t(0..self.units.len(), &y, train)?, train)
    }

    /// The stem: its convolution (BN-ReLU and max-pool in original / ImageNet nets).
    pub(crate) fn stem_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != 3 {
            candle_core::bail!("ResNet input must be [N, 3, H, W], got {:?}", x.shape());
        }
        let mut y = match self.trains_blocked(x, train) {
            Some(lanes) => self.stem_conv.forward_into_blocks(x, lanes)?,
            None => self.stem_conv.forward(x)?,
        };
        if let Some(norm) = &self.stem_norm {
            y = match self.config.unit.stem_relu() {
                true => norm.forward_relu(&y, train)?,
                false => norm.forward_t(&y, train)?,
            };
        }
        if let Some(pool) = &self.stem_pool {
            y = pool.forward(&y)?;
        }
        Ok(y)
    }

    /// The blocks `B` in which a training pass on `x` keeps its activations from the stem's output to the head's
    /// input (`[N, C/B, H, W, B]`, see `ops::channel_blocks`), if it does: on the CPU, with a kernel set whose
    /// blocked kernels run every pass of every unit's convolution, in nets of units that read nothing else
    /// (original units with identity, option-A or projection shortcuts: the first paper's nets), the ImageNet
    /// stem's max-pool included. The blocked kernels then read and write each activation in place, where NCHW
    /// tensors were converted on the way into and out of every convolution pass.
    pub fn trains_blocked(&self, x: &Tensor, train: bool) -> Option<usize> {
        let isa = Isa::current();
        let (_, _, h, w) = x.dims4().ok()?;
        let applies = train
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.final_norm.is_none()
            && self.units.iter().all(|u| u.keeps_channel_blocks(train))
            && self.conv_shapes((h, w)).iter().enumerate().all(|(i, s)| {
                let op = Conv2dOp {
                    stride: s.stride,
                    padding: s.padding,
                };
                let conv = (s.in_channels, s.out_channels, s.kernel);
                // The stem reads the NCHW images and writes blocks.
                op.runs_blocked(conv, s.input, isa, i == 0)
            });
        applies.then(|| blocked::lanes(isa))
    }

    /// The residual units `range`, in order.
    pub(crate) fn units_t(&self, range: Range<usize>, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        for unit in &self.units[range] {
            y = unit.forward_t(&y, train)?;
            if !train {
                // The weights are variables, so every result keeps its inputs alive for a backward pass;
                // in evaluation nothing needs them: cut the graph so each activation is freed after use.
                y = y.detach();
            }
        }
        Ok(y)
    }

    /// The number of residual units.
    pub fn unit_count(&self) -> usize {
        self.units.len()
    }

    /// (The final BN-ReLU or ReLU,) global average pooling: the classifier's input from the last unit's output.
    pub(crate) fn pooled_t(&self, y: &Tensor, train: bool) -> Result<Tensor> {
        let nchw;
        let y = match y.rank() {
            5 => {
                nchw = channel_blocks::from_blocked(y)?;
                &nchw
            }
            _ => y,
        };
        match (&self.final_norm, self.config.unit) {
            (Some(norm), _) => norm.forward_relu(y, train)?.mean((2, 3)),
            (None, Unit::ReluOnlyPreActivation) => y.relu()?.mean((2, 3)),
            (None, _) => y.mean((2, 3)),
        }
    }

    /// Logits from the last unit's output.
    pub(crate) fn head_t(&self, y: &Tensor, train: bool) -> Result<Tensor> {
        self.head.forward(&self.pooled_t(y, train)?)
    }
}

/// The classifier. timm's resnetv2 keeps it as a 1×1 conv (`[classes, features, 1, 1]`): same numbers, other shape.
fn head(features: usize, classes: usize, layout: WeightLayout, vb: VarBuilder) -> Result<Linear> {
    // PyTorch's nn.Linear default: U(−1/√fan_in, 1/√fan_in) for weight and bias.
    let bound = 1.0 / (features as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = if layout.head_is_conv() {
        vb.get_with_hints((classes, features, 1, 1), "weight", init)?
            .reshape((classes, features))?
    } else {
        vb.get_with_hints((classes, features), "weight", init)?
    };
    let bias = vb.get_with_hints(classes, "bias", init)?;
    Ok(Linear::new(weight, Some(bias)))
}

impl ModuleT for ResNet {
    /// Logits `[N, classes]`. `train` selects batch statistics (and updates the running ones).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.head.forward(&self.features_t(x, train)?)
    }
}
