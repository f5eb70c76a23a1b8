//! ResNets of He et al. (2016) — *Deep Residual Learning* and *Identity Mappings* — as trainable candle modules
//! whose outputs, gradients and BatchNorm statistics match PyTorch's, under the names of the published checkpoints.
//!
//! ```no_run
//! use resnet_core::Model;
//! let model = Model::by_name("resnet20", 0, &candle_core::Device::Cpu)?;
//! assert_eq!(model.parameter_count(), 269_722);
//! # Ok::<(), resnet_core::ResNetError>(())
//! ```

pub mod ablations;
pub mod batch_norm;
mod blocked_net;
mod bn_relu_conv;
pub mod combine;
mod config;
pub mod conv;
mod device;
mod error;
pub mod folded;
mod gradient_sum;
mod model;
mod network;
pub mod ops;
pub mod optim;
pub mod param_store;
pub mod recompute;
pub mod registry;
pub mod residual_unit;
mod saved_tensors;
pub mod shortcut;
pub mod threads;
mod train_step;
pub mod transformers_names;
mod weight_layout;
pub mod weights;

pub use config::{Block, Combine, Family, ResNetConfig, Shortcut, Unit};
pub use device::{device_name, parse_device};
pub use error::{ResNetError, Result};
pub use gradient_sum::GradientSum;
pub use model::Model;
pub use network::{LayerSummary, ResNet};
pub use registry::{config_for, REGISTERED};
pub use saved_tensors::saved_tensor_bytes;
pub use train_step::{
    batch_gradients, cross_entropy, train_step, BatchGradients, StepOptions, TrainStep,
};
pub use weight_layout::WeightLayout;
