//! The training loop: SGD on shuffled augmented batches, scheduled learning rate, periodic evaluation,
//! metrics rows and atomic checkpoints; resumable exactly from any checkpoint.

use crate::checkpoint::{self, TrainingState, BEST, LAST};
use crate::metrics_log::{MetricsLog, Row};
use crate::recipe::{Recipe, TrainTransform};
use crate::schedule::LrSchedule;
use anyhow::{bail, Context, Result};
use candle_core::{Device, D};
use datasets::{
    Augmentation, DataSource, Loader, LoaderConfig, Normalization, Normalize, Pipeline, Split,
};
use resnet_core::optim::Sgd;
use resnet_core::{train_step, Family, Model, StepOptions};
use resnet_infer::evaluate::{evaluate, EvalOptions};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

pub struct RunOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub keep: usize,
    pub threads: usize,
    pub strict: bool,
    /// Recompute activations per segment in backward ([`resnet_core::recompute`]).
    pub recompute: bool,
    pub device: Device,
}

pub struct Trainer {
    recipe: Recipe,
    model: Model,
    sgd: Sgd,
    schedule: LrSchedule,
    loader: Loader,
    test: Option<Split>,
    normalize: Normalize,
    state: TrainingState,
    options: RunOptions,
    log: MetricsLog,
}

impl Trainer {
    /// A new run with `recipe`, or (`resume`) the continuation of the checkpoint in `options.out` with its own
    /// recipe, where `extend_to` may raise the iteration count.
    pub fn new(
        recipe: Recipe,
        options: RunOptions,
        resume: bool,
        extend_to: Option<u64>,
    ) -> Result<Self> {
        let restored = if resume {
            Some(checkpoint::restore(&options.out)?)
        } else {
            None
        };
        let recipe = match &restored {
            Some(r) => Recipe {
                iterations: extend_to.unwrap_or(r.state.recipe.iterations),
                ..r.state.recipe.clone()
            },
            None => recipe,
        };
        let seed = restored.as_ref().map_or(options.seed, |r| r.state.seed);

        let mut config = recipe.model_config()?;
        let source = DataSource::open(&options.data)?;
        eprintln!("data: {}", source.summary());
        let train = source
            .train
            .clone()
            .or_else(|| source.test.clone())
            .context("the dataset has no images")?;
        if source.train.is_none() {
            eprintln!(
                "warning: no train/ split found: training on all of {}",
                options.data.display()
            );
        }
        config.num_classes = train.classes.len();
        let (train, val) =
            if recipe.validation_holdout > 0 && train.len() > 2 * recipe.validation_holdout {
                let (t, v) = train.split_off_validation(recipe.validation_holdout, 0);
                eprintln!(
                    "held out {} training images for validation (fixed split); training on {}",
                    v.len(),
                    t.len()
                );
                (t, Some(v))
            } else {
                (train, None)
            };
        let test = source
            .test
            .clone()
            .filter(|_| source.train.is_some())
            .or(val);

        let model = Model::new(&config, seed, &options.device)?;
        let (normalize, augmentation) = match (config.family, recipe.augment) {
            (Family::Cifar, _) | (_, TrainTransform::Cifar) => {
                (Normalize::CIFAR10, Augmentation::CifarTrain { padding: 4 })
            }
            (Family::ImageNet, TrainTransform::ScaleAugment) => (
                Normalize::IMAGENET,
                Augmentation::ScaleAugment {
                    min: 256,
                    max: 480,
                    crop: 224,
                    lighting: 0.1,
                },
            ),
            (Family::ImageNet, TrainTransform::RandomResizedCrop) => (
                Normalize::IMAGENET,
                Augmentation::RandomResizedCrop { crop: 224 },
            ),
        };
        let loader = Loader::new(
            train,
            Pipeline::new(augmentation, Normalization::PerChannel(normalize)),
            LoaderConfig {
                batch_size: recipe.batch_size,
                shuffle: true,
                seed,
                threads: options.threads,
                prefetch: 4,
                drop_last: true,
                strict: options.strict,
            },
        )?;
        if options.device.is_cpu() {
            eprintln!(
                "compute: CPU, {} kernels (RESNET_CPU_ISA), {} threads",
                resnet_core::ops::isa::Isa::current(),
                resnet_core::threads::kernel_threads()
            );
        }
        eprintln!(
            "loader: batch {}, {} decode threads",
            recipe.batch_size,
            loader.decode_threads()
        );
        let mut sgd = Sgd::new(model.trainable_vars(), recipe.sgd);
        let mut schedule = LrSchedule::new(
            recipe.sgd.lr,
            recipe.schedule.clone(),
            recipe.warmup.clone(),
            recipe.iterations,
        );
        let mut state = TrainingState {
            iteration: 0,
            epoch: 0,
            batch_in_epoch: 0,
            seed,
            schedule: schedule.state.clone(),
            best_test_error: None,
            recipe: recipe.clone(),
        };
        if let Some(r) = &restored {
            model.load_tensors(&r.tensors, &r.path)?;
            sgd.load_state(&checkpoint::optimizer_tensors(&r.tensors))?;
            schedule.state = r.state.schedule.clone();
            state = TrainingState {
                recipe: recipe.clone(),
                ..r.state.clone()
            };
            eprintln!(
                "resumed from {} at iteration {}",
                r.path.display(),
                state.iteration
            );
        }
        std::fs::create_dir_all(&options.out)
            .with_context(|| format!("creating {}", options.out.display()))?;
        std::fs::write(
            options.out.join("config.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "recipe": recipe, "network": config, "seed": seed, "data": options.data,
            "checkpoint_every": options.checkpoint_every, "keep": options.keep,
            "normalize": {"mean": normalize.mean, "std": normalize.std},
            }))?,
        )?;
        let log = MetricsLog::open(&options.out, restored.as_ref().map(|r| r.state.iteration))?;
        Ok(Self {
            recipe,
            model,
            sgd,
            schedule,
            loader,
            test,
            normalize,
            state,
            options,
            log,
        })
    }

    /// The paper authors' BN recalibration: plain averages over training batches (of the next epoch's order).
    fn recalibrate_batch_norm(&self) -> Result<()> {
        let n = self.recipe.bn_recalibration_batches;
        let device = self.options.device.clone();
        let batches = self.loader.epoch(self.state.epoch + 1, 0).take(n).map(|b| {
            let b = b.map_err(candle_core::Error::wrap)?;
            Ok(b.to_tensors(&device).map_err(candle_core::Error::wrap)?.0)
        });
        let used = self.model.recalibrate_batch_norm(batches)?;
        eprintln!("recomputed BatchNorm statistics over {used} training batches");
        Ok(())
    }

    /// `curves.png` of this run; a figure that cannot be drawn is reported, never fatal.
    fn draw_curves(&self) {
        let drawn =
            crate::metrics_log::read_rows(&self.options.out.join("metrics.csv")).and_then(|rows| {
                let curve = crate::curves::Curve {
                    label: &self.recipe.model,
                    rows: &rows,
                };
                let title = format!("{} ({})", self.recipe.model, self.recipe.name);
                crate::curves::draw(&[curve], &title, &self.options.out.join("curves.png"))
            });
        if let Err(e) = drawn {
            eprintln!("warning: could not draw curves.png: {e:#}");
        }
    }

    pub fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    /// Where a stopped run can be resumed from, for its error message.
    fn last_good_checkpoint(&self) -> String {
        let last = self.options.out.join(LAST);
        if last.is_file() {
            format!("the last good checkpoint is {}", last.display())
        } else {
            "no checkpoint had been written yet".into()
        }
    }

    fn checkpoint(&self) -> Result<()> {
        let out = &self.options.out;
        // Never replace a good checkpoint with weights or BN statistics that have overflowed.
        for (name, tensor) in self.model.state_dict()? {
            let norm = tensor.sqr()?.sum_all()?.to_scalar::<f32>()?;
            if !norm.is_finite() {
                bail!(
                    "{name} is no longer finite at iteration {}: training stopped; {}",
                    self.state.iteration,
                    self.last_good_checkpoint()
                );
            }
        }
        checkpoint::save(
            &checkpoint::numbered_path(out, self.state.iteration),
            &self.model,
            &self.sgd,
            &self.state,
            &self.normalize,
        )?;
        checkpoint::save(
            &out.join(LAST),
            &self.model,
            &self.sgd,
            &self.state,
            &self.normalize,
        )?;
        checkpoint::prune(out, self.options.keep);
        Ok(())
    }

    fn evaluate(&mut self) -> Result<Option<(f64, f64)>> {
        let Some(test) = self.test.clone() else {
            return Ok(None);
        };
        let options = EvalOptions {
            batch_size: 250,
            normalize: self.normalize,
            threads: self.options.threads,
            device: self.options.device.clone(),
            ..Default::default()
        };
        let report = evaluate(&self.model, test, &options)?;
        let (top1, top5) = (report.accuracy.top1_error, report.accuracy.top5_error);
        self.schedule.observe_eval(top1);
        if self.state.best_test_error.is_none_or(|best| top1 < best) {
            self.state.best_test_error = Some(top1);
            checkpoint::save(
                &self.options.out.join(BEST),
                &self.model,
                &self.sgd,
                &self.state,
                &self.normalize,
            )?;
        }
        Ok(Some((top1, top5)))
    }

    /// Trains until the recipe's iteration count; returns the final test error if there is a test split.
    pub fn run(&mut self) -> Result<Option<f64>> {
        let total = self.recipe.iterations;
        let start = self.state.iteration;
        let device = self.options.device.clone();
        let (mut loss_sum, mut err_sum, mut rows_n, mut images) = (0.0, 0.0, 0u64, 0usize);
        let mut since = Instant::now();
        let mut final_error = None;
        // A progress bar on a terminal; plain log lines otherwise (and above the bar).
        let bar = std::io::stderr().is_terminal().then(|| {
            let style =
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            let bar = indicatif::ProgressBar::new(total).with_style(style);
            bar.set_position(self.state.iteration);
            bar
        });
        while self.state.iteration < total {
            let epoch = self.state.epoch;
            for batch in self.loader.epoch(epoch, self.state.batch_in_epoch) {
                let batch = batch?;
                if batch.is_empty() {
                    continue;
                }
                let it = self.state.iteration;
                let lr = self.schedule.lr(it);
                self.sgd.set_lr(lr);
                let (x, y) = batch.to_tensors(&device)?;
                let step_options = StepOptions {
                    label_smoothing: self.recipe.label_smoothing,
                    recompute: self.options.recompute,
                };
                // Dropout-shortcut masks are drawn for this iteration, whether run straight or resumed.
                self.model.set_training_step(it);
                let step = train_step(&self.model, &mut self.sgd, &x, &y, &step_options)?;
                if step.recomputed_segments > 0 && it == start {
                    // Said by the step itself: the flag reached the training step.
                    eprintln!(
                        "memory: activations recomputed in backward, {} segments of {} residual units",
                        step.recomputed_segments,
                        self.model.net.unit_count()
                    );
                }
                let (logits, loss_value) = (step.logits, step.loss as f64);
                if !loss_value.is_finite() {
                    bail!(
                        "the loss became {loss_value} at iteration {}: training stopped; {}",
                        it + 1,
                        self.last_good_checkpoint()
                    );
                }
                let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                let wrong = predicted
                    .iter()
                    .zip(&batch.labels)
                    .filter(|(p, l)| p != l)
                    .count();
                let error = 100.0 * wrong as f64 / batch.len() as f64;
                self.schedule.observe_train_error(error);
                self.state.iteration += 1;
                self.state.batch_in_epoch += 1;
                self.state.schedule = self.schedule.state.clone();
                if let Some(bar) = &bar {
                    let ips = images as f64 / since.elapsed().as_secs_f64().max(1e-9);
                    bar.set_position(self.state.iteration);
                    bar.set_message(format!(
                        "loss {loss_value:.4}, error {error:.1} %, lr {lr}, {ips:.0} img/s"
                    ));
                }
                loss_sum += loss_value;
                err_sum += error;
                rows_n += 1;
                images += batch.len();

                let it = self.state.iteration;
                if it == total && self.recipe.bn_recalibration_batches > 0 {
                    self.recalibrate_batch_norm()?;
                }
                let eval_now = it == total
                    || (self.recipe.eval_every > 0 && it.is_multiple_of(self.recipe.eval_every));
                let log_now = eval_now || it.is_multiple_of(self.recipe.log_every.max(1));
                if log_now {
                    let ips = images as f64 / since.elapsed().as_secs_f64().max(1e-9);
                    let mut row = Row {
                        iteration: it,
                        epoch: self.state.epoch,
                        lr,
                        train_loss: Some(loss_sum / rows_n as f64),
                        train_error: Some(err_sum / rows_n as f64),
                        images_per_second: Some(ips),
                        ..Default::default()
                    };
                    if eval_now {
                        if let Some((top1, top5)) = self.evaluate()? {
                            row.test_top1_error = Some(top1);
                            row.test_top5_error = Some(top5);
                            final_error = Some(top1);
                        }
                    }
                    self.log.append(&row)?;
                    if row.test_top1_error.is_some() {
                        self.draw_curves();
                    }
                    let eta = (total - it) as f64 * self.recipe.batch_size as f64 / ips.max(1e-9);
                    let test = row
                        .test_top1_error
                        .map_or(String::new(), |e| format!(", test error {e:.2} %"));
                    let line = format!(
                        "iteration {it}/{total} (epoch {}): lr {lr}, loss {:.4}, train error {:.2} %{test}, {ips:.1} img/s, ETA {:.0} s",
                        self.state.epoch,
                        row.train_loss.unwrap_or(0.0),
                        row.train_error.unwrap_or(0.0),
                        eta
                    );
                    match &bar {
                        Some(bar) => bar.println(line),
                        None => eprintln!("{line}"),
                    }
                    (loss_sum, err_sum, rows_n, images) = (0.0, 0.0, 0, 0);
                    since = Instant::now();
                }
                if it == total
                    || (self.options.checkpoint_every > 0
                        && it.is_multiple_of(self.options.checkpoint_every))
                {
                    self.checkpoint()?;
                }
                if it >= total {
                    break;
                }
            }
            if self.state.iteration < total
                || self.state.batch_in_epoch >= self.loader.batches_per_epoch()
            {
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let skipped = self.loader.skipped();
        if !skipped.is_empty() {
            eprintln!(
                "warning: {} unreadable image(s) were skipped",
                skipped.len()
            );
        }
        Ok(final_error)
    }
}
