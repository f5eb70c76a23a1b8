//! `ROOT/<class>/*.{jpg,jpeg,png}`: class index = position of the folder name in sorted order, as torchvision's
//! `ImageFolder` (the order pretrained ImageNet heads assume).

use crate::{DatasetError, Result};
use std::path::{Path, PathBuf};

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    /// `(file, class index)`, sorted by class then file name.
    pub samples: Vec<(PathBuf, u32)>,
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = std::fs::read_dir(dir).map_err(|e| DatasetError::Io {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut entries: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    Ok(entries)
}

impl ImageFolder {
    pub fn open(root: &Path) -> Result<Self> {
        let class_dirs: Vec<PathBuf> = sorted_entries(root)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        if class_dirs.is_empty() {
            return Err(DatasetError::NotFound {
                path: root.to_path_buf(),
                looked_for: "class folders ROOT/<class>/*.{jpg,jpeg,png}".into(),
            });
        }
        let mut classes = Vec::new();
        let mut samples = Vec::new();
        for (label, dir) in class_dirs.iter().enumerate() {
            classes.push(
                dir.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
            for file in sorted_entries(dir)? {
                if file.is_file() && has_image_extension(&file) {
                    samples.push((file, label as u32));
                }
            }
        }
        if samples.is_empty() {
            return Err(DatasetError::NotFound {
                path: root.to_path_buf(),
                looked_for: format!(
                    "*.jpg/*.jpeg/*.png files in its {} class folders",
                    classes.len()
                ),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            samples,
        })
    }

    /// Images per class, in class order.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for (_, label) in &self.samples {
            counts[*label as usize] += 1;
        }
        counts
    }
}
