//! Bias-free convolutions with He (fan-out) initialisation, as every ResNet convolution.

use crate::ops::conv::Conv2dOp;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// A bias-free convolution, square kernel, padding `kernel / 2`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn padding(&self) -> usize {
        self.padding
    }

    /// The convolution with its output in blocks of `lanes` (CPU training of the nets of
    /// `ResNet::trains_blocked`, whose stem this is; see `Conv2dOp::forward_into_blocks`).
    pub fn forward_into_blocks(&self, x: &Tensor, lanes: usize) -> Result<Tensor> {
        let op = Conv2dOp {
            stride: self.stride,
            padding: self.padding,
        };
        op.forward_into_blocks(x, &self.weight, lanes)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let op = Conv2dOp {
                stride: self.stride,
                padding: self.padding,
            };
            x.contiguous()?.apply_op2(&self.weight.contiguous()?, op)
        } else {
            // Other devices: candle's own convolution until they have a fast path.
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)
        }
    }
}

/// `kernel`×`kernel` convolution, padding `kernel / 2`, weight `[out, in, k, k]` under `vb`.
/// He et al. (2015) fan-out: N(0, 2 / (out · k²)), as torchvision's `kaiming_normal_(mode="fan_out")`.
pub fn conv(
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    zero: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let init = if zero {
        Init::Const(0.0)
    } else {
        Init::Randn {
            mean: 0.0,
            stdev: (2.0 / (out_ch * kernel * kernel) as f64).sqrt(),
        }
    };
    let weight = vb.get_with_hints((out_ch, in_ch, kernel, kernel), "weight", init)?;
    Ok(Conv2d {
        weight,
        stride,
        padding: kernel / 2,
    })
}

/// One convolution as it is applied: channels, square kernel, stride, padding and input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ConvShape {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub input: (usize, usize),
}

impl ConvShape {
    pub fn of(conv: &Conv2d, input: (usize, usize)) -> Self {
        let (out_channels, in_channels, kernel, _) = conv.weight().dims4().unwrap_or((0, 0, 0, 0));
        Self {
            in_channels,
            out_channels,
            kernel,
            stride: conv.stride,
            padding: conv.padding,
            input,
        }
    }

    pub fn output(&self) -> (usize, usize) {
        let side = |x: usize| (x + 2 * self.padding - self.kernel) / self.stride + 1;
        (side(self.input.0), side(self.input.1))
    }

    /// Multiply-adds per image.
    pub fn macs(&self) -> u64 {
        let (oh, ow) = self.output();
        (oh * ow * self.out_channels * self.in_channels * self.kernel * self.kernel) as u64
    }
}

/// Multiply-adds of `conv` on an `h`×`w` input, and the output size.
pub fn conv_macs(conv: &Conv2d, hw: (usize, usize)) -> (u64, (usize, usize)) {
    let shape = ConvShape::of(conv, hw);
    (shape.macs(), shape.output())
}
