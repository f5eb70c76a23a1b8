use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot decode image {path}: {reason}")]
    Decode { path: PathBuf, reason: String },

    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DatasetError>;
