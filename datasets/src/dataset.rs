//! A dataset on disk, found from one `--data DIR`: CIFAR-10/100 binaries or an ImageFolder tree with splits.

use crate::cifar_binary::{self, CifarKind, CifarRecords, CIFAR10_CLASSES};
use crate::cifar_parquet;
use crate::hub::{HubRepo, RepoKind};
use crate::image_folder::ImageFolder;
use crate::transforms::open_rgb;
use crate::{DatasetError, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Item {
    Record(usize),
    File(PathBuf),
}

/// One split (train, validation or test): labelled images, decoded on demand.
#[derive(Debug, Clone)]
pub struct Split {
    pub classes: Arc<Vec<String>>,
    records: Option<Arc<CifarRecords>>,
    items: Vec<(Item, u32)>,
}

impl Split {
    fn from_records(records: CifarRecords, classes: Vec<String>) -> Self {
        let items = records
            .labels
            .iter()
            .enumerate()
            .map(|(i, &l)| (Item::Record(i), l))
            .collect();
        Self {
            classes: Arc::new(classes),
            records: Some(Arc::new(records)),
            items,
        }
    }

    fn from_folder(folder: ImageFolder) -> Self {
        Self {
            classes: Arc::new(folder.classes),
            records: None,
            items: folder
                .samples
                .into_iter()
                .map(|(p, l)| (Item::File(p), l))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn label(&self, i: usize) -> u32 {
        self.items[i].1
    }

    pub fn labels(&self) -> Vec<u32> {
        self.items.iter().map(|(_, l)| *l).collect()
    }

    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for (_, l) in &self.items {
            counts[*l as usize] += 1;
        }
        counts
    }

    /// Where sample `i` comes from, for messages.
    pub fn describe_item(&self, i: usize) -> String {
        match &self.items[i].0 {
            Item::Record(r) => format!("record {r}"),
            Item::File(p) => p.display().to_string(),
        }
    }

    /// Decodes sample `i` to RGB.
    pub fn image(&self, i: usize) -> Result<RgbImage> {
        match (&self.items[i].0, &self.records) {
            (Item::Record(r), Some(records)) => Ok(cifar_record_to_rgb(records.image(*r))),
            (Item::File(p), _) => open_rgb(p),
            (Item::Record(_), None) => unreachable!("record items always come with their records"),
        }
    }

    /// The samples at `indices`, in that order (e.g. a train/validation split).
    pub fn subset(&self, indices: &[usize]) -> Split {
        Split {
            classes: self.classes.clone(),
            records: self.records.clone(),
            items: indices.iter().map(|&i| self.items[i].clone()).collect(),
        }
    }

    /// The paper's protocol: a fixed-seed split of the training set into `len − holdout` / `holdout`.
    pub fn split_off_validation(&self, holdout: usize, seed: u64) -> (Split, Split) {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let holdout = holdout.min(self.len());
        let (val, train) = order.split_at(holdout);
        let (mut train, mut val) = (train.to_vec(), val.to_vec());
        train.sort_unstable();
        val.sort_unstable();
        (self.subset(&train), self.subset(&val))
    }
}

/// Class names when the files carry none: CIFAR-10's documented order, or `class_N` for CIFAR-100.
fn default_classes(kind: CifarKind) -> Vec<String> {
    match kind {
        CifarKind::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        CifarKind::Cifar100 => (0..100).map(|i| format!("class_{i}")).collect(),
    }
}

/// CHW bytes of a CIFAR record to an RGB image.
pub fn cifar_record_to_rgb(chw: &[u8]) -> RgbImage {
    RgbImage::from_fn(32, 32, |x, y| {
        let i = (y * 32 + x) as usize;
        image::Rgb([chw[i], chw[1024 + i], chw[2048 + i]])
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    Cifar10,
    Cifar100,
    ImageFolder,
}

/// Where `--data` reads from when none is given: CIFAR-10 on the Hugging Face hub.
pub const DEFAULT_HUB_DATA: &str = "hub:uoft-cs/cifar10";

/// What `--data DIR` (or `--data hub:OWNER/REPO`) holds.
#[derive(Debug, Clone)]
pub struct DataSource {
    pub root: PathBuf,
    pub kind: DatasetKind,
    /// How it was stored, for messages: "CIFAR-10 binaries", "ImageFolder", "CIFAR-10 parquet (hub:…)".
    pub layout: String,
    pub train: Option<Split>,
    /// The `test/` (or `val/`) split; a bare ImageFolder root counts as a test split.
    pub test: Option<Split>,
}

impl DataSource {
    /// Detects the layout of `dir` (see the crate docs) and indexes it. `hub:OWNER/REPO[@REV][:CONFIG]` reads a
    /// CIFAR dataset from the Hugging Face hub instead (see [`DataSource::from_hub`]).
    pub fn open(dir: &Path) -> Result<Self> {
        if let Some(spec) = dir.to_str().and_then(|s| s.strip_prefix("hub:")) {
            return Self::from_hub(spec, true);
        }
        if !dir.is_dir() {
            return Err(DatasetError::NotFound {
                path: dir.to_path_buf(),
                looked_for: "a directory (it does not exist or is not a directory)".into(),
            });
        }
        for (sub, kind) in [
            ("cifar-10-batches-bin", CifarKind::Cifar10),
            ("cifar-100-binary", CifarKind::Cifar100),
        ] {
            let candidates = [dir.join(sub), dir.to_path_buf()];
            if let Some(bin) = candidates
                .iter()
                .find(|d| d.join(cifar_binary::split_files(kind, false)[0]).is_file())
            {
                return Self::cifar(bin, kind);
            }
        }
        let split_dir = |names: &[&str]| names.iter().map(|n| dir.join(n)).find(|p| p.is_dir());
        let train_dir = split_dir(&["train"]);
        let test_dir = split_dir(&["val", "test"]);
        let (train, test) = match (train_dir, test_dir) {
            (None, None) => (None, Some(ImageFolder::open(dir).map_err(|_| DatasetError::NotFound {
                path: dir.to_path_buf(),
                looked_for: "cifar-10-batches-bin/ or cifar-100-binary/ (CIFAR binaries), train/ and val/ or test/ \
                             (ImageFolder splits), or class folders of .jpg/.jpeg/.png images"
                    .into(),
            })?)),
            (train, test) => (
                train.map(|d| ImageFolder::open(&d)).transpose()?,
                test.map(|d| ImageFolder::open(&d)).transpose()?,
            ),
        };
        if let (Some(a), Some(b)) = (&train, &test) {
            if a.classes != b.classes {
                return Err(DatasetError::Invalid {
                    what: dir.display().to_string(),
                    reason: format!(
                        "train has {} classes and test {}: their folders must match",
                        a.classes.len(),
                        b.classes.len()
                    ),
                });
            }
        }
        Ok(Self {
            root: dir.to_path_buf(),
            kind: DatasetKind::ImageFolder,
            layout: "ImageFolder".into(),
            train: train.map(Split::from_folder),
            test: test.map(Split::from_folder),
        })
    }

    fn cifar(bin: &Path, kind: CifarKind) -> Result<Self> {
        let classes: Vec<String> = match kind {
            CifarKind::Cifar10 => default_classes(kind),
            // The binary release names fine labels only in fine_label_names.txt; fall back to indices.
            CifarKind::Cifar100 => std::fs::read_to_string(bin.join("fine_label_names.txt"))
                .map(|s| {
                    s.lines()
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_else(|_| default_classes(kind)),
        };
        let has_train = cifar_binary::split_files(kind, true)
            .iter()
            .all(|f| bin.join(f).is_file());
        let train = match has_train {
            true => Some(Split::from_records(
                cifar_binary::read_split(bin, kind, true)?,
                classes.clone(),
            )),
            false => None,
        };
        let test = Split::from_records(cifar_binary::read_split(bin, kind, false)?, classes);
        Ok(Self {
            root: bin.to_path_buf(),
            kind: match kind {
                CifarKind::Cifar10 => DatasetKind::Cifar10,
                CifarKind::Cifar100 => DatasetKind::Cifar100,
            },
            layout: format!("{} binaries", kind.title()),
            train,
            test: Some(test),
        })
    }

    /// As [`DataSource::open`], for evaluation: from the hub, only the test split is fetched.
    pub fn open_test(dir: &Path) -> Result<Self> {
        match dir.to_str().and_then(|s| s.strip_prefix("hub:")) {
            Some(spec) => Self::from_hub(spec, false),
            None => Self::open(dir),
        }
    }

    /// CIFAR-10/100 from a hub dataset repository laid out like `uoft-cs/cifar10` / `uoft-cs/cifar100`:
    /// `CONFIG/{train,test}-00000-of-00001.parquet`, CONFIG defaulting to `cifar100` for a repository whose name
    /// says 100 and `plain_text` otherwise; the training split only `with_train`. Files go through the hf-hub
    /// cache; decoded once into memory.
    pub fn from_hub(spec: &str, with_train: bool) -> Result<Self> {
        let bad_spec = |reason: String| DatasetError::Invalid {
            what: format!("--data hub:{spec}"),
            reason: format!("{reason}; expected hub:OWNER/REPO[@REVISION][:CONFIG]"),
        };
        let (repo_spec, config) = match spec.split_once(':') {
            Some((_, "")) => return Err(bad_spec("empty CONFIG".into())),
            Some((r, c)) => (r, Some(c.to_string())),
            None => (spec, None),
        };
        let repo = HubRepo::parse(RepoKind::Dataset, repo_spec).map_err(bad_spec)?;
        let kind = match repo.name.contains("100") {
            true => CifarKind::Cifar100,
            false => CifarKind::Cifar10,
        };
        let config = config.unwrap_or_else(|| match kind {
            CifarKind::Cifar100 => "cifar100".into(),
            CifarKind::Cifar10 => "plain_text".into(),
        });
        let read = |split: &str| -> Result<(PathBuf, cifar_parquet::ParquetCifar)> {
            let path = repo.fetch(&format!("{config}/{split}-00000-of-00001.parquet"))?;
            Ok((path.clone(), cifar_parquet::read(&path)?))
        };
        let (test_path, test) = read("test")?;
        let train = match with_train {
            true => Some(read("train")?.1),
            false => None,
        };
        let classes = test
            .classes
            .clone()
            .unwrap_or_else(|| default_classes(kind));
        for (split, data) in [("train", train.as_ref()), ("test", Some(&test))] {
            let labels = data.map_or(&[][..], |d| &d.records.labels[..]);
            if let Some(&l) = labels.iter().find(|&&l| l as usize >= classes.len()) {
                return Err(DatasetError::Invalid {
                    what: format!("{split} split of hub:{spec}"),
                    reason: format!("label {l} but {} classes", classes.len()),
                });
            }
        }
        let kind = match classes.len() {
            10 => DatasetKind::Cifar10,
            _ => DatasetKind::Cifar100,
        };
        Ok(Self {
            root: test_path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            kind,
            layout: format!(
                "{} parquet (hub:{})",
                if kind == DatasetKind::Cifar10 {
                    "CIFAR-10"
                } else {
                    "CIFAR-100"
                },
                repo_spec
            ),
            train: train.map(|t| Split::from_records(t.records, classes.clone())),
            test: Some(Split::from_records(test.records, classes)),
        })
    }

    pub fn classes(&self) -> &[String] {
        self.test
            .as_ref()
            .or(self.train.as_ref())
            .map(|s| s.classes.as_slice())
            .unwrap_or(&[])
    }

    /// One line saying what was found, e.g. "CIFAR-10 binaries in DIR: 10 classes, train 50000, test 10000".
    pub fn summary(&self) -> String {
        let size = |s: &Option<Split>| {
            s.as_ref()
                .map_or("none".to_string(), |s| s.len().to_string())
        };
        format!(
            "{} in {}: {} classes, train {}, test {}",
            self.layout,
            self.root.display(),
            self.classes().len(),
            size(&self.train),
            size(&self.test)
        )
    }
}
