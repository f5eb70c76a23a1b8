//! Inference in a channel-blocked layout kept from the network's first convolution to its head: the
//! activations are `[N, C/B, H, W, B]` with `B` the lanes of a vector register, so the inner loops load `B`
//! output channels' weights as one vector and broadcast one input value (oneDNN's and ONNX Runtime's NCHWc),
//! and the folded BatchNorm's bias, the residual and the ReLU are applied as each output is stored.
//!
//! The model code (`blocked_net`) calls [`BlockedConv`], [`max_pool`], [`zero_pad_shortcut`] and
//! [`Blocked::mean_pool`]; the training convolution calls [`conv`], [`input_grad_3x3`],
//! [`strided_input_grad_3x3_nchw`] and [`weight_grad`] on NCHW tensors, and the same with
//! [`strided_input_grad_3x3_blocked`] on channel-blocked ones (`ops::channel_blocks`: the same layout, read
//! through [`BlockedSlice`]); the vector operations per kernel set are in `simd`.

mod conv;
mod layout;
mod nchw;
mod pool;
mod strided_input_grad;
mod weight_grad;

pub use conv::{lanes, BlockedAlgorithm, BlockedConv};
pub use layout::{blocked_values, Blocked, BlockedSlice, Source};
pub use nchw::{conv, input_grad_3x3, OutputLayout};
pub use pool::{max_pool, zero_pad_shortcut, zero_pad_shortcut_values};
pub use strided_input_grad::{
    strided_input_grad_3x3_blocked, strided_input_grad_3x3_nchw, strided_input_grad_applies,
};
pub use weight_grad::{weight_grad, weight_grad_applies};
