//! Top-1 / top-5 error and per-class accuracy, accumulated batch by batch.

use serde::Serialize;

#[derive(Debug, Clone, Default)]
pub struct Accuracy {
    classes: usize,
    images: usize,
    top1_correct: usize,
    top5_correct: usize,
    per_class_total: Vec<usize>,
    per_class_correct: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccuracyReport {
    pub images: usize,
    /// Percent.
    pub top1_error: f64,
    /// Percent.
    pub top5_error: f64,
    /// Top-1 accuracy (percent) of each class, in class order.
    pub per_class_accuracy: Vec<f64>,
}

/// Indices of the `k` largest scores, best first (ties: lower index first).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

impl Accuracy {
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            per_class_total: vec![0; classes],
            per_class_correct: vec![0; classes],
            ..Default::default()
        }
    }

    /// `scores` is row-major `[labels.len(), classes]`.
    pub fn add(&mut self, scores: &[f32], labels: &[u32]) {
        for (row, &label) in scores.chunks(self.classes).zip(labels) {
            let best = top_k(row, 5);
            let label = label as usize;
            self.images += 1;
            if label < self.classes {
                self.per_class_total[label] += 1;
            }
            if best.first() == Some(&label) {
                self.top1_correct += 1;
                self.per_class_correct[label] += 1;
            }
            if best.contains(&label) {
                self.top5_correct += 1;
            }
        }
    }

    pub fn report(&self) -> AccuracyReport {
        let pct = |correct: usize, total: usize| {
            if total == 0 {
                0.0
            } else {
                100.0 * correct as f64 / total as f64
            }
        };
        AccuracyReport {
            images: self.images,
            top1_error: 100.0 - pct(self.top1_correct, self.images),
            top5_error: 100.0 - pct(self.top5_correct, self.images),
            per_class_accuracy: self
                .per_class_correct
                .iter()
                .zip(&self.per_class_total)
                .map(|(&c, &t)| pct(c, t))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_top5_and_per_class_by_hand() {
        let mut acc = Accuracy::new(6);
        // Row 0: label 2 is best. Row 1: label 0 is 6th of 6 (outside top-5). Row 2: label 5 is 2nd.
        let scores = [
            0.1, 0.2, 0.9, 0.0, 0.0, 0.0, //
            0.0, 0.5, 0.4, 0.3, 0.2, 0.1, //
            0.0, 0.0, 0.0, 0.0, 0.9, 0.8,
        ];
        acc.add(&scores, &[2, 0, 5]);
        let r = acc.report();
        assert_eq!(r.images, 3);
        assert!((r.top1_error - 100.0 * 2.0 / 3.0).abs() < 1e-9);
        assert!((r.top5_error - 100.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.per_class_accuracy, vec![0.0, 0.0, 100.0, 0.0, 0.0, 0.0]);
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
    }
}
