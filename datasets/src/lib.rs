//! Input pipelines for CIFAR-10/100 and ImageFolder datasets, with the papers' preprocessing.

mod error;
pub mod transforms;

pub use error::{DatasetError, Result};
