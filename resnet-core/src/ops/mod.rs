//! The CPU kernels, apart from the papers' architecture: convolution algorithms, BatchNorm, pooling, the
//! option-A shortcut and element-wise fusions, each a candle custom op with its backward pass.
//!
//! The model code calls the ops of this module and nothing below it. Two decisions are made in one place
//! each: which kernel set runs on this CPU ([`isa`]: AVX-512, AVX2 or portable code, `RESNET_CPU_ISA`
//! forces one) and which convolution algorithm runs for a shape ([`conv::Algorithm::choose`]).
//!
//! Imports go one way: `conv` (the ops and the dispatch) uses the algorithm files (`blocked`, `strided_pointwise`,
//! `winograd`), which use the helpers (`gemm`, `taps`, `simd`, `cpu_slice`, `isa`, `cache_size`, `parallel`: every op's
//! parallel loops run on its kernel threads); nothing here uses the model. A CIFAR net of the first paper trains on
//! channel-blocked tensors between its stem and its head (`channel_blocks`), which `conv`, `batch_norm` and
//! `zero_pad_shortcut` read as they are.

pub(crate) mod add_relu;
pub mod batch_norm;
mod batch_norm_kernels;
pub mod blocked;
mod cache_size;
pub mod channel_blocks;
pub mod conv;
pub(crate) mod cpu_slice;
pub mod dropout_mask;
mod gemm;
pub mod isa;
pub mod linear;
pub mod max_pool;
pub mod parallel;
pub mod peak;
pub(crate) mod simd;
mod strided_pointwise;
mod taps;
mod winograd;
pub(crate) mod zero_pad_shortcut;
