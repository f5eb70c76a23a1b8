//! The channel-blocked layout `[N, C/B, H, W, B]` of CPU training tensors (B = 16 with AVX-512, 8 with AVX2:
//! `blocked::lanes`), in which the CIFAR nets of the first paper train (`ResNet::trains_blocked`): the stem's
//! convolution writes its output in blocks (`Conv2dOp::forward_into_blocks`), the convolutions (`ops::conv`),
//! BatchNorm (`ops::batch_norm`), the option-A shortcut and the element-wise ops read and write that layout as
//! it is, and the head's input goes back to NCHW ([`from_blocked`]): the blocked kernels need no conversion per
//! layer. [`to_blocked`] converts an NCHW tensor (the gradient of [`from_blocked`]).

use crate::ops::blocked::{blocked_values, BlockedSlice};
use crate::ops::cpu_slice::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `[N, C, H, W]` → `[N, C/lanes, H, W, lanes]`; the gradient goes back to NCHW.
pub fn to_blocked(x: &Tensor, lanes: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ToBlocked { lanes })
}

/// `[N, C/B, H, W, B]` → `[N, C, H, W]`; the gradient goes back to blocks.
pub fn from_blocked(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FromBlocked)
}

struct ToBlocked {
    lanes: usize,
}

impl CustomOp1 for ToBlocked {
    fn name(&self) -> &'static str {
        "to-channel-blocks"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "channel-blocking input")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let values = blocked_values(x, (n, c, h, w), self.lanes)?;
        let shape = Shape::from((n, c / self.lanes, h, w, self.lanes));
        Ok((CpuStorage::F32(values), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(from_blocked(grad)?))
    }
}

struct FromBlocked;

impl CustomOp1 for FromBlocked {
    fn name(&self) -> &'static str {
        "from-channel-blocks"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "channel-blocked input")?;
        let &[n, blocks, h, w, lanes] = layout.shape().dims() else {
            candle_core::bail!(
                "from channel blocks: expected [N, C/B, H, W, B], got {:?}",
                layout.shape()
            );
        };
        let values = BlockedSlice::new(x, (n, blocks * lanes, h, w), lanes)?.to_nchw_vec();
        Ok((
            CpuStorage::F32(values),
            Shape::from((n, blocks * lanes, h, w)),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(to_blocked(grad, x.dim(4)?)?))
    }
}
