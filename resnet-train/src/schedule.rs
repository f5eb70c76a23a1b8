//! The learning rate at each iteration: warm-up, then the recipe's schedule. Its state is saved in checkpoints.

use crate::recipe::{Schedule, Warmup};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Training errors (percent) of the last iterations, for the warm-up rule.
const WINDOW: usize = 50;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub warmup_done: bool,
    /// Product of the plateau reductions so far.
    pub plateau_scale: f64,
    /// Lowest evaluation error so far; `None` before the first.
    pub best_error: Option<f64>,
    pub bad_evaluations: u32,
    pub recent_train_errors: VecDeque<f64>,
}

#[derive(Debug, Clone)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub schedule: Schedule,
    pub warmup: Warmup,
    pub total_iterations: u64,
    pub state: ScheduleState,
}

impl LrSchedule {
    pub fn new(base_lr: f64, schedule: Schedule, warmup: Warmup, total_iterations: u64) -> Self {
        Self {
            base_lr,
            schedule,
            warmup,
            total_iterations,
            state: ScheduleState {
                warmup_done: false,
                plateau_scale: 1.0,
                best_error: None,
                bad_evaluations: 0,
                recent_train_errors: VecDeque::new(),
            },
        }
    }

    /// Learning rate of iteration `it` (0-based).
    pub fn lr(&self, it: u64) -> f64 {
        let warm = match self.warmup {
            Warmup::None => None,
            Warmup::UntilTrainError {
                lr, max_iterations, ..
            } => (!self.state.warmup_done && it < max_iterations).then_some(lr),
            Warmup::Constant { lr, iterations } => (it < iterations).then_some(lr),
            Warmup::Linear { iterations } => {
                (it < iterations).then(|| self.base_lr * (it + 1) as f64 / iterations as f64)
            }
        };
        if let Some(lr) = warm {
            return lr;
        }
        match &self.schedule {
            Schedule::Step { milestones, factor } => {
                let passed = milestones.iter().filter(|&&m| it >= m).count() as i32;
                self.base_lr * factor.powi(passed)
            }
            Schedule::Plateau { .. } => self.base_lr * self.state.plateau_scale,
            Schedule::Cosine => {
                let t = it as f64 / self.total_iterations.max(1) as f64;
                0.5 * self.base_lr * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
            }
            Schedule::Constant => self.base_lr,
        }
    }

    /// Records the training error (percent) of one iteration; ends an error-driven warm-up.
    pub fn observe_train_error(&mut self, error: f64) {
        let recent = &mut self.state.recent_train_errors;
        recent.push_back(error);
        if recent.len() > WINDOW {
            recent.pop_front();
        }
        if let Warmup::UntilTrainError { error_below, .. } = self.warmup {
            let mean = recent.iter().sum::<f64>() / recent.len() as f64;
            if recent.len() >= WINDOW.min(10) && mean < error_below {
                self.state.warmup_done = true;
            }
        }
    }

    /// Records a test/validation error (percent); reduces the rate on a plateau.
    pub fn observe_eval(&mut self, error: f64) {
        if let Schedule::Plateau {
            factor,
            patience,
            threshold,
        } = self.schedule
        {
            if self
                .state
                .best_error
                .is_none_or(|best| error < best - threshold)
            {
                self.state.best_error = Some(error);
                self.state.bad_evaluations = 0;
            } else {
                self.state.bad_evaluations += 1;
                if self.state.bad_evaluations >= patience {
                    self.state.plateau_scale *= factor;
                    self.state.bad_evaluations = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_step_schedule() {
        let s = LrSchedule::new(
            0.1,
            Schedule::Step {
                milestones: vec![32_000, 48_000],
                factor: 0.1,
            },
            Warmup::None,
            64_000,
        );
        assert_eq!(s.lr(0), 0.1);
        assert_eq!(s.lr(31_999), 0.1);
        assert!((s.lr(32_000) - 0.01).abs() < 1e-12);
        assert!((s.lr(48_000) - 0.001).abs() < 1e-12);
    }

    #[test]
    fn warmup_until_training_error_falls_below_80_percent() {
        let warmup = Warmup::UntilTrainError {
            lr: 0.01,
            error_below: 80.0,
            max_iterations: 2_000,
        };
        let mut s = LrSchedule::new(0.1, Schedule::Constant, warmup.clone(), 64_000);
        for _ in 0..20 {
            s.observe_train_error(90.0);
        }
        assert_eq!(s.lr(20), 0.01);
        for _ in 0..50 {
            s.observe_train_error(70.0);
        }
        assert_eq!(s.lr(70), 0.1);
        // Capped: never more than max_iterations of warm-up.
        let s = LrSchedule::new(0.1, Schedule::Constant, warmup, 64_000);
        assert_eq!(s.lr(2_000), 0.1);
    }

    #[test]
    fn plateau_cosine_and_linear_warmup() {
        let mut s = LrSchedule::new(
            0.1,
            Schedule::Plateau {
                factor: 0.1,
                patience: 2,
                threshold: 0.1,
            },
            Warmup::None,
            100,
        );
        for e in [50.0, 40.0, 40.05, 39.95] {
            s.observe_eval(e);
        }
        assert!(
            (s.lr(0) - 0.01).abs() < 1e-12,
            "two evaluations without 0.1 points of progress"
        );
        let c = LrSchedule::new(
            0.2,
            Schedule::Cosine,
            Warmup::Linear { iterations: 10 },
            110,
        );
        assert!((c.lr(0) - 0.02).abs() < 1e-12);
        assert!((c.lr(55) - 0.1).abs() < 1e-12);
        assert!(c.lr(110).abs() < 1e-12);
    }
}
