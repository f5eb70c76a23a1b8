use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {reason}")]
    Io { path: PathBuf, reason: String },

    #[error("cannot decode image {path}: {reason}")]
    Decode { path: PathBuf, reason: String },

    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },

    #[error("no dataset found in {path}: {looked_for}")]
    NotFound { path: PathBuf, looked_for: String },

    #[error("{count} unreadable image(s) with --strict; first: {first}")]
    Strict { count: usize, first: String },

    #[error("cannot fetch {what} from the Hugging Face hub: {reason}")]
    Hub { what: String, reason: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DatasetError>;
