//! The library behind the `resnet-infer` binary: loading weights from anywhere, evaluation, classification.

pub mod class_names;
pub mod evaluate;
pub mod loading;
pub mod metrics;

pub use evaluate::{evaluate, EvalOptions, EvalReport};
pub use loading::{load_model, LoadedModel};
