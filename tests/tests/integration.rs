//! All cross-crate tests in one binary (see Cargo.toml); one module per concern.

mod channel_blocks;
mod datasets_hub;
mod datasets_sources;
mod datasets_transforms;
mod eval_parity;
mod folding;
mod identity_mappings;
mod initialization;
mod op_shapes;
mod pretrained_cifar;
mod registry;
mod sgd_parity;
mod train_parity;
mod train_step_parity;
mod weight_files;
