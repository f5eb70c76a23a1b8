//! Input pipelines for CIFAR-10/100 and ImageFolder datasets, with the papers' preprocessing.
//!
//! `DataSource::open(dir)` recognises, in this order: CIFAR-10 binaries (`cifar-10-batches-bin/` or the files
//! themselves), CIFAR-100 binaries (`cifar-100-binary/`), an ImageFolder tree with `train/` and `val/` or `test/`
//! splits, or a bare ImageFolder root (`<class>/*.jpg`); `hub:OWNER/REPO` reads CIFAR-10/100 parquet files from
//! the Hugging Face hub (default: `uoft-cs/cifar10`). A `Loader` turns a split into shuffled, augmented batches.

pub mod cifar_binary;
pub mod cifar_parquet;
pub mod dataset;
mod error;
pub mod hub;
pub mod image_folder;
pub mod loader;
pub mod pipeline;
pub mod transforms;

pub use dataset::{DataSource, DatasetKind, Split, DEFAULT_HUB_DATA};
pub use error::{DatasetError, Result};
pub use image::RgbImage;
pub use loader::{Batch, Loader, LoaderConfig, Shard};
pub use pipeline::{Augmentation, Normalization, Pipeline};
pub use transforms::Normalize;
