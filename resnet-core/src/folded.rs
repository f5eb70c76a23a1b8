//! Inference with every BatchNorm folded into the convolution before it (`W' = W·γ/σ`, `b = β − μ·γ/σ`), and
//! the ReLU that follows applied in the same pass: no normalisation pass is left at inference time.
//!
//! Original (post-activation) units fold completely. Pre-activation units normalise the *input* of a
//! convolution, after a ReLU, which no convolution before them can absorb; those nets run unfolded.

use crate::batch_norm::BatchNorm;
use crate::blocked_net::BlockedResNet;
use crate::conv::Conv2d;
use crate::ops::conv::{Epilogue, FoldedConv2dOp};
use crate::ops::isa::Isa;
use crate::ops::max_pool::MaxPool2d;
use crate::shortcut::ShortcutPath;
use crate::{ResNet, Unit};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::Linear;
use std::sync::{Arc, OnceLock};

/// `ReLU?(BN(conv(x)))` as one convolution with a bias. The CPU op (with its bias as a plain vector) is built
/// once at folding time, not per forward.
#[derive(Debug, Clone)]
pub(crate) struct FoldedConv {
    pub(crate) weight: Tensor,
    /// The same bias as a tensor, for candle's path on other devices.
    bias: Tensor,
    pub(crate) op: FoldedConv2dOp,
}

impl FoldedConv {
    fn new(conv: &Conv2d, norm: &BatchNorm, relu: bool) -> Result<Self> {
        let (scale, shift) = norm.eval_affine()?;
        let weight = conv
            .weight()
            .broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?
            .detach();
        let op = FoldedConv2dOp {
            stride: conv.stride(),
            padding: conv.padding(),
            epilogue: Epilogue {
                bias: shift.to_device(&candle_core::Device::Cpu)?.to_vec1()?,
                relu,
            },
        };
        Ok(Self {
            weight,
            bias: shift.detach(),
            op,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None)
    }

    /// `ReLU?(conv(x) + b + residual)`: on the CPU the residual is added in the convolution's epilogue.
    fn forward_with(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let x = x.contiguous()?;
            return match residual {
                Some(r) => x.apply_op3_no_bwd(&self.weight, &r.contiguous()?, &self.op),
                None => x.apply_op2_no_bwd(&self.weight, &self.op),
            };
        }
        let mut y = x
            .conv2d(&self.weight, self.op.padding, self.op.stride, 1, 1)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        if let Some(r) = residual {
            y = (y + r)?;
        }
        if self.op.epilogue.relu {
            y.relu()
        } else {
            Ok(y)
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum FoldedShortcut {
    Unchanged(ShortcutPath),
    Projection(FoldedConv),
}

#[derive(Debug, Clone)]
pub(crate) struct FoldedUnit {
    pub(crate) branch: Vec<FoldedConv>,
    pub(crate) shortcut: Option<FoldedShortcut>,
}

/// A network of original units with its BatchNorms folded, for evaluation only.
#[derive(Debug, Clone)]
pub struct FoldedResNet {
    pub(crate) stem: FoldedConv,
    pub(crate) pool: Option<MaxPool2d>,
    pub(crate) units: Vec<FoldedUnit>,
    pub(crate) head: Linear,
    /// The same network with its weights packed for the blocked layout of each kernel set, built on first use
    /// (`None`: a layer has no blocked kernel).
    blocked: [OnceLock<Option<Arc<BlockedResNet>>>; Isa::ALL.len()],
}

impl FoldedResNet {
    /// `None` for pre-activation nets (see the module docs).
    pub fn new(net: &ResNet) -> Result<Option<Self>> {
        // The joins of Fig. 2 other than the sum (and dropout, a sum in evaluation) are not folded.
        if net.config.unit != Unit::Original || !net.units.iter().all(|u| u.join.is_sum(false)) {
            return Ok(None);
        }
        let Some(stem_norm) = &net.stem_norm else {
            return Ok(None);
        };
        let mut units = Vec::with_capacity(net.units.len());
        for unit in &net.units {
            // Every conv ends in a ReLU: the branch's last one after the shortcut is added (in its epilogue).
            let branch = unit
                .convs
                .iter()
                .zip(&unit.norms)
                .map(|(conv, norm)| FoldedConv::new(conv, norm, true))
                .collect::<Result<Vec<_>>>()?;
            let shortcut = match &unit.shortcut {
                None => None,
                Some(ShortcutPath::Projection {
                    conv,
                    norm: Some(norm),
                }) => Some(FoldedShortcut::Projection(FoldedConv::new(
                    conv, norm, false,
                )?)),
                Some(other) => Some(FoldedShortcut::Unchanged(other.clone())),
            };
            units.push(FoldedUnit { branch, shortcut });
        }
        Ok(Some(Self {
            stem: FoldedConv::new(&net.stem_conv, stem_norm, true)?,
            pool: net.stem_pool,
            units,
            head: net.head.clone(),
            blocked: Default::default(),
        }))
    }

    /// Logits `[N, classes]`: in the blocked layout on the CPU, else through candle's ops.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let isa = Isa::current();
            let slot = &self.blocked[isa as usize];
            let blocked = match slot.get() {
                Some(b) => b.clone(),
                None => {
                    let built = BlockedResNet::new(self, isa)?.map(Arc::new);
                    slot.get_or_init(|| built).clone()
                }
            };
            if let Some(blocked) = blocked {
                return blocked.forward(&x.contiguous()?);
            }
        }
        self.forward_unblocked(x)
    }

    /// Logits through candle's ops and the NCHW kernels.
    pub fn forward_unblocked(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.stem.forward(&x.detach())?;
        if let Some(pool) = &self.pool {
            y = pool.forward(&y)?.detach();
        }
        for unit in &self.units {
            let shortcut = match &unit.shortcut {
                Some(FoldedShortcut::Projection(conv)) => Some(conv.forward(&y)?),
                Some(FoldedShortcut::Unchanged(path)) => Some(path.forward_t(&y, &y, false)?),
                None => None,
            };
            let Some((last, first)) = unit.branch.split_last() else {
                candle_core::bail!("folded residual unit without convolutions");
            };
            let mut b = y.clone();
            for conv in first {
                b = conv.forward(&b)?;
            }
            y = last.forward_with(&b, shortcut.as_ref())?.detach();
        }
        self.head.forward(&y.mean((2, 3))?.detach())
    }
}

/// What evaluation runs: the folded network where it exists (and was asked for), else the network itself.
#[derive(Debug, Clone)]
pub enum Predictor {
    Folded(FoldedResNet, crate::ResNetConfig),
    Unfolded(ResNet),
}

impl Predictor {
    pub fn new(net: &ResNet, fold: bool) -> Result<Self> {
        Ok(
            match fold.then(|| FoldedResNet::new(net)).transpose()?.flatten() {
                Some(folded) => Predictor::Folded(folded, net.config().clone()),
                None => Predictor::Unfolded(net.clone()),
            },
        )
    }

    pub fn config(&self) -> &crate::ResNetConfig {
        match self {
            Predictor::Folded(_, config) => config,
            Predictor::Unfolded(net) => net.config(),
        }
    }

    pub fn is_folded(&self) -> bool {
        matches!(self, Predictor::Folded(..))
    }

    /// Evaluation-mode logits (computed on rayon's pool, see [`crate::threads::on_pool`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::threads::on_pool(x.device(), || match self {
            Predictor::Folded(net, _) => net.forward(x),
            Predictor::Unfolded(net) => candle_core::ModuleT::forward_t(net, x, false),
        })
    }
}
