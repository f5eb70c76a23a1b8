//! Typed errors of the library: every failure names the model, file or tensor involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ResNetError {
    #[error("unknown model `{name}`: expected one of the registered names ({known}) or a CIFAR depth like resnet{{6n+2}}, plain{{6n+2}}, preact_resnet{{6n+2|9n+2}}, with at most one Identity Mappings suffix (resnet56_relu_preact, resnet110_1layer, …)")]
    UnknownModel { name: String, known: String },

    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A value handed to the library that it cannot use: what it was and why.
    #[error("{what} {reason}")]
    Invalid { what: String, reason: String },

    #[error("cannot read weights file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a valid safetensors file (truncated or another format): {reason}")]
    NotSafetensors { path: PathBuf, reason: String },

    #[error("{path}: tensor `{name}` has dtype {dtype}, expected a floating-point tensor (f16, bf16, f32 or f64)")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    #[error("{path}: tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: {} tensor(s) the model needs are missing: {}", missing.len(), preview(missing))]
    MissingTensors { path: PathBuf, missing: Vec<String> },

    #[error("{path}: {} tensor(s) in the file are not part of the model: {}", unexpected.len(), preview(unexpected))]
    UnexpectedTensors {
        path: PathBuf,
        unexpected: Vec<String>,
    },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// At most eight names, so that a wholly wrong file still gives a readable message.
fn preview(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} … and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

pub type Result<T> = std::result::Result<T, ResNetError>;
