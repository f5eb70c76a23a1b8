//! Bias-free convolutions with He (fan-out) initialisation, as every ResNet convolution.

use candle_core::Result;
use candle_nn::{Conv2d, Conv2dConfig, Init, VarBuilder};

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
    let config = Conv2dConfig {
        padding: kernel / 2,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, None, config))
}

/// Multiply-adds of `conv` on an `h`×`w` input, and the output size.
pub fn conv_macs(conv: &Conv2d, (h, w): (usize, usize)) -> (u64, (usize, usize)) {
    let cfg = conv.config();
    let (out_ch, in_ch, kh, kw) = conv.weight().dims4().unwrap_or((0, 0, 0, 0));
    let oh = (h + 2 * cfg.padding - kh) / cfg.stride + 1;
    let ow = (w + 2 * cfg.padding - kw) / cfg.stride + 1;
    ((oh * ow * out_ch * in_ch * kh * kw) as u64, (oh, ow))
}
