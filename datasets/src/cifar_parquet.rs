//! CIFAR-10/100 as the Hugging Face hub keeps them (`uoft-cs/cifar10`, `uoft-cs/cifar100`): parquet files with
//! an image column (`img`, a struct of PNG `bytes` and `path`) and an integer label column (`label`, or
//! `fine_label` for CIFAR-100). The class names come from the `huggingface` schema metadata (a ClassLabel).
//! Images are decoded once, in parallel, into the same CHW records as the binary release.

use crate::cifar_binary::{CifarRecords, PIXELS};
use crate::{DatasetError, Result};
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use rayon::prelude::*;
use std::path::Path;

/// Image and label columns, in the order they are looked for.
const IMAGE_COLUMNS: [&str; 2] = ["img", "image"];
const LABEL_COLUMNS: [&str; 2] = ["label", "fine_label"];

/// The records of one parquet file and, when the file names them, its class names.
pub struct ParquetCifar {
    pub records: CifarRecords,
    pub classes: Option<Vec<String>>,
}

pub fn read(path: &Path) -> Result<ParquetCifar> {
    let invalid = |reason: String| DatasetError::Invalid {
        what: path.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| DatasetError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| invalid(format!("not a readable parquet file ({e})")))?;
    let meta = reader.metadata().file_metadata();
    let names: Vec<String> = meta
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let find = |wanted: &[&'static str]| {
        wanted
            .iter()
            .find(|w| names.iter().any(|n| n == *w))
            .copied()
    };
    let image_column = find(&IMAGE_COLUMNS).ok_or_else(|| {
        invalid(format!(
            "no image column ({IMAGE_COLUMNS:?}); columns are {names:?}"
        ))
    })?;
    let label_column = find(&LABEL_COLUMNS).ok_or_else(|| {
        invalid(format!(
            "no label column ({LABEL_COLUMNS:?}); columns are {names:?}"
        ))
    })?;
    let classes = meta
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == "huggingface"))
        .and_then(|k| k.value.as_deref())
        .and_then(|v| class_names(v, label_column));

    let mut encoded = Vec::with_capacity(meta.num_rows().max(0) as usize);
    let mut labels = Vec::with_capacity(encoded.capacity());
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| invalid(e.to_string()))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| invalid(format!("row {i}: {e}")))?;
        let (mut bytes, mut label) = (None, None);
        for (name, field) in row.get_column_iter() {
            if name == image_column {
                bytes = image_bytes(field);
            } else if name == label_column {
                label = integer(field);
            }
        }
        let bytes = bytes
            .ok_or_else(|| invalid(format!("row {i}: `{image_column}` holds no image bytes")))?;
        let label = label
            .filter(|l| *l >= 0)
            .ok_or_else(|| invalid(format!("row {i}: `{label_column}` is not a class index")))?;
        encoded.push(bytes);
        labels.push(label as u32);
    }
    // Decoded straight into the records (the caller checks the labels against the class names).
    let mut pixels = vec![0u8; encoded.len() * PIXELS];
    pixels
        .par_chunks_mut(PIXELS)
        .zip(encoded.par_iter())
        .enumerate()
        .try_for_each(|(i, (chw, bytes))| {
            decode_chw(bytes.data(), chw).map_err(|reason| invalid(format!("row {i}: {reason}")))
        })?;
    Ok(ParquetCifar {
        records: CifarRecords { pixels, labels },
        classes,
    })
}

/// The PNG/JPEG bytes of an image cell (shared, not copied): hub datasets store `{bytes, path}` structs;
/// plain binary also works.
fn image_bytes(field: &Field) -> Option<ByteArray> {
    match field {
        Field::Bytes(b) => Some(b.clone()),
        Field::Group(group) => {
            group
                .get_column_iter()
                .find_map(|(name, f)| match (name.as_str(), f) {
                    ("bytes", Field::Bytes(b)) => Some(b.clone()),
                    _ => None,
                })
        }
        _ => None,
    }
}

fn integer(field: &Field) -> Option<i64> {
    Some(match *field {
        Field::Byte(v) => v as i64,
        Field::Short(v) => v as i64,
        Field::Int(v) => v as i64,
        Field::Long(v) => v,
        Field::UByte(v) => v as i64,
        Field::UShort(v) => v as i64,
        Field::UInt(v) => v as i64,
        Field::ULong(v) => i64::try_from(v).ok()?,
        _ => return None,
    })
}

/// A 32×32 RGB image into `chw` as CHW bytes, like a CIFAR binary record.
fn decode_chw(bytes: &[u8], chw: &mut [u8]) -> std::result::Result<(), String> {
    let image = image::load_from_memory(bytes)
        .map_err(|e| format!("cannot decode the image ({e})"))?
        .into_rgb8();
    if image.dimensions() != (32, 32) {
        return Err(format!(
            "image is {}×{}, CIFAR images are 32×32",
            image.width(),
            image.height()
        ));
    }
    for (i, p) in image.pixels().enumerate() {
        for c in 0..3 {
            chw[c * 1024 + i] = p.0[c];
        }
    }
    Ok(())
}

/// The ClassLabel names of `column` in the datasets library's schema metadata.
fn class_names(metadata: &str, column: &str) -> Option<Vec<String>> {
    let meta: serde_json::Value = serde_json::from_str(metadata).ok()?;
    let names = meta["info"]["features"][column]["names"].as_array()?;
    names.iter().map(|n| n.as_str().map(String::from)).collect()
}
