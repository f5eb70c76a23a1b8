//! `metrics.csv`: a row per evaluation and every `log_every` iterations; empty cells where a value was not
//! measured at that row.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const HEADER: &str =
    "iteration,epoch,lr,train_loss,train_error,test_top1_error,test_top5_error,images_per_second";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub iteration: u64,
    pub epoch: u64,
    pub lr: f64,
    pub train_loss: Option<f64>,
    pub train_error: Option<f64>,
    pub test_top1_error: Option<f64>,
    pub test_top5_error: Option<f64>,
    pub images_per_second: Option<f64>,
}

fn cell(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| format!("{v:.6}"))
}

impl Row {
    pub fn to_csv(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{}",
            self.iteration,
            self.epoch,
            self.lr,
            cell(self.train_loss),
            cell(self.train_error),
            cell(self.test_top1_error),
            cell(self.test_top5_error),
            cell(self.images_per_second.map(|v| (v * 10.0).round() / 10.0)),
        )
    }

    pub fn parse(line: &str) -> Option<Row> {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 8 {
            return None;
        }
        let opt = |s: &str| s.parse::<f64>().ok();
        Some(Row {
            iteration: f[0].parse().ok()?,
            epoch: f[1].parse().ok()?,
            lr: f[2].parse().ok()?,
            train_loss: opt(f[3]),
            train_error: opt(f[4]),
            test_top1_error: opt(f[5]),
            test_top5_error: opt(f[6]),
            images_per_second: opt(f[7]),
        })
    }
}

pub struct MetricsLog {
    path: PathBuf,
}

/// All rows of a metrics file.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().skip(1).filter_map(Row::parse).collect())
}

impl MetricsLog {
    /// Opens `dir/metrics.csv`, keeping only rows up to `resume_iteration` (rows written after the checkpoint
    /// a run resumes from would otherwise appear twice).
    pub fn open(dir: &Path, resume_iteration: Option<u64>) -> Result<Self> {
        let path = dir.join("metrics.csv");
        let kept: Vec<Row> = match resume_iteration {
            Some(it) if path.is_file() => read_rows(&path)?
                .into_iter()
                .filter(|r| r.iteration <= it)
                .collect(),
            _ => Vec::new(),
        };
        let mut text = format!("{HEADER}\n");
        for r in kept {
            text.push_str(&r.to_csv());
            text.push('\n');
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn append(&self, row: &Row) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("appending to {}", self.path.display()))?;
        writeln!(f, "{}", row.to_csv())?;
        Ok(())
    }
}
