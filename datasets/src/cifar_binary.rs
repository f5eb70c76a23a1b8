//! CIFAR-10 and CIFAR-100 in their official binary layouts.
//!
//! - CIFAR-10: `cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin`, records of 1 label byte + 3072 pixels.
//! - CIFAR-100: `cifar-100-binary/{train,test}.bin`, records of a coarse and a fine label byte + 3072 pixels.
//!
//! Pixels are stored channel-major (1024 red, 1024 green, 1024 blue), rows top to bottom.

use crate::{DatasetError, Result};
use std::path::Path;

pub const PIXELS: usize = 3 * 32 * 32;

pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    Cifar10,
    /// Labels are the fine (100-class) labels.
    Cifar100,
}

impl CifarKind {
    fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 => 2,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "CIFAR-10",
            CifarKind::Cifar100 => "CIFAR-100",
        }
    }

    pub fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 => 100,
        }
    }
}

/// Images as CHW u8 records of 3072 bytes, one label each.
#[derive(Debug, Clone, Default)]
pub struct CifarRecords {
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
}

impl CifarRecords {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * PIXELS..(i + 1) * PIXELS]
    }
}

/// Reads one binary file, appending its records; a size that is not a whole number of records is an error.
pub fn read_file(path: &Path, kind: CifarKind, into: &mut CifarRecords) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let record = kind.label_bytes() + PIXELS;
    if bytes.is_empty() || bytes.len() % record != 0 {
        return Err(DatasetError::Invalid {
            what: path.display().to_string(),
            reason: format!(
                "{} bytes is not a whole number of {kind:?} records of {record} bytes (a full file of 10 000 is {})",
                bytes.len(),
                record * 10_000
            ),
        });
    }
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = rec[kind.label_bytes() - 1] as u32;
        if label as usize >= kind.num_classes() {
            return Err(DatasetError::Invalid {
                what: path.display().to_string(),
                reason: format!(
                    "record {i} has label {label}, expected < {}",
                    kind.num_classes()
                ),
            });
        }
        into.labels.push(label);
        into.pixels.extend_from_slice(&rec[kind.label_bytes()..]);
    }
    Ok(())
}

/// The training and test files of a CIFAR binary folder.
pub fn split_files(kind: CifarKind, train: bool) -> Vec<&'static str> {
    match (kind, train) {
        (CifarKind::Cifar10, true) => vec![
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
        ],
        (CifarKind::Cifar10, false) => vec!["test_batch.bin"],
        (CifarKind::Cifar100, true) => vec!["train.bin"],
        (CifarKind::Cifar100, false) => vec!["test.bin"],
    }
}

pub fn read_split(dir: &Path, kind: CifarKind, train: bool) -> Result<CifarRecords> {
    let mut records = CifarRecords::default();
    for file in split_files(kind, train) {
        read_file(&dir.join(file), kind, &mut records)?;
    }
    Ok(records)
}

/// Serialises records in the official layout (for tests and conversions); CIFAR-100 coarse labels are written as 0.
pub fn write_file(path: &Path, kind: CifarKind, records: &CifarRecords) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(records.len() * (PIXELS + kind.label_bytes()));
    for i in 0..records.len() {
        if kind == CifarKind::Cifar100 {
            out.push(0);
        }
        out.push(records.labels[i] as u8);
        out.extend_from_slice(records.image(i));
    }
    std::fs::write(path, out)
}
