//! The training loop: SGD on shuffled augmented batches, scheduled learning rate, periodic evaluation,
//! metrics rows and atomic checkpoints; resumable exactly from any checkpoint.

use crate::checkpoint::{self, TrainingState, BEST, LAST};
use crate::distributed::{self, Collective};
use crate::metrics_log::{MetricsLog, Row};
use crate::recipe::{Recipe, TrainTransform};
use crate::schedule::LrSchedule;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, D};
use datasets::{
    Augmentation, Batch, DataSource, Loader, LoaderConfig, Normalization, Normalize, Pipeline,
    Shard, Split,
};
use resnet_core::optim::Sgd;
use resnet_core::threads::on_pool;
use resnet_core::{batch_gradients, train_step, Family, GradientSum, Model, StepOptions};
use resnet_infer::evaluate::{evaluate, EvalOptions};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

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
    /// Micro-batches of `batch_size` per step and rank (`--accumulate`); `None`: 1, or on resume what keeps
    /// the run's global batch.
    pub accumulate: Option<usize>,
    pub device: Device,
}

/// What one step did, over all ranks.
struct StepOutcome {
    loss: f64,
    /// Percent of the step's images misclassified by the training-mode forward.
    error: f64,
    images: usize,
    recomputed_segments: usize,
    /// Time in the gradient all-reduce (zero in one process).
    all_reduce: Duration,
    /// Time waiting for the slowest rank at the step's first collective.
    waited: Duration,
}

/// Images of `labels` whose top logit is another class.
fn wrong_predictions(logits: &candle_core::Tensor, labels: &[u32]) -> Result<usize> {
    let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(predicted.iter().zip(labels).filter(|(p, l)| p != l).count())
}

/// Micro-batches per step for this world: `--accumulate`, 1 for a new run without it; a resumed run keeps
/// its global batch (ranks × accumulate) whatever the world size, when it divides.
fn micro_batches_per_step(
    given: Option<usize>,
    saved: Option<&serde_json::Value>,
    ranks: usize,
) -> Result<usize> {
    let Some(saved) = saved else {
        return Ok(given.unwrap_or(1));
    };
    let field = |k: &str| saved[k].as_u64().unwrap_or(1) as usize;
    let (saved_ranks, saved_k) = (field("ranks"), field("accumulate"));
    let product = saved_ranks * saved_k;
    let k = given.unwrap_or(product / ranks);
    if k == 0 || ranks * k != product {
        bail!(
            "the run was trained with {saved_ranks} rank(s) × --accumulate {saved_k}: resuming it on {ranks} rank(s) needs --accumulate {} to keep its global batch",
            if product.is_multiple_of(ranks) { (product / ranks).to_string() } else { format!("(none: {ranks} does not divide {product})") }
        );
    }
    Ok(k)
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
    /// Rank 0's metrics; other ranks write nothing.
    log: Option<MetricsLog>,
    world: Rc<dyn Collective>,
    /// Micro-batches per step and rank.
    accumulate: usize,
    /// The gradients of a step's micro-batches, when there is more than one (accumulation or ranks).
    gradients: GradientSum,
    all_reduce_time: Duration,
    wait_time: Duration,
}

impl Trainer {
    /// A new run with `recipe`, or (`resume`) the continuation of the checkpoint in `options.out` with its own
    /// recipe, where `extend_to` may raise the iteration count.
    pub fn new(
        recipe: Recipe,
        options: RunOptions,
        resume: bool,
        extend_to: Option<u64>,
        world: Rc<dyn Collective>,
    ) -> Result<Self> {
        let (rank, ranks) = (world.rank(), world.ranks());
        let lead = rank == 0;
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
        let saved = match resume {
            true => Some(crate::saved_config(&options.out)?),
            false => None,
        };
        let accumulate = micro_batches_per_step(options.accumulate, saved.as_ref(), ranks)?;

        let mut config = recipe.model_config()?;
        let source = DataSource::open(&options.data)?;
        if lead {
            eprintln!("data: {}", source.summary());
        }
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
                shard: Shard {
                    rank,
                    ranks,
                    micro_batches: accumulate,
                },
            },
        )?;
        let per_step = recipe.batch_size * ranks * accumulate;
        if loader.len() < per_step {
            bail!(
                "a step takes {per_step} images (--batch-size {} × {ranks} rank(s) × --accumulate {accumulate}) but the training split has {}: use fewer ranks or a smaller batch",
                recipe.batch_size,
                loader.len()
            );
        }
        if let Some(test) = test.as_ref().filter(|t| t.len() < ranks) {
            bail!(
                "the test split has {} images, fewer than the {ranks} ranks that share its evaluation",
                test.len()
            );
        }
        if options.device.is_cpu() && lead {
            eprintln!(
                "compute: CPU, {} kernels (RESNET_CPU_ISA), {} threads",
                resnet_core::ops::isa::Isa::current(),
                resnet_core::threads::kernel_threads()
            );
        }
        if lead {
            eprintln!(
                "loader: batch {}, {} decode threads",
                recipe.batch_size,
                loader.decode_threads()
            );
        }
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
            if lead {
                eprintln!(
                    "resumed from {} at iteration {}",
                    r.path.display(),
                    state.iteration
                );
            }
        }
        let gradients = GradientSum::new(&model.trainable_vars());
        if ranks > 1 {
            let facts = [
                ("the network", serde_json::to_string(&config)?),
                (
                    "the training state (recipe, seed, iteration)",
                    serde_json::to_string(&state)?,
                ),
                (
                    "the data (training and test images)",
                    format!("{} {:?}", loader.len(), test.as_ref().map(|t| t.len())),
                ),
                ("--accumulate", accumulate.to_string()),
            ];
            distributed::agree_and_broadcast(world.as_ref(), &model, &facts)?;
            if lead {
                let bytes = 4 * gradients.len();
                eprintln!(
                    "distributed: {}; global batch {per_step} = {ranks} ranks × {accumulate} micro-batch(es) × {}; {bytes} bytes of gradients all-reduced per step (ring: {} sent per rank)",
                    world.describe(),
                    recipe.batch_size,
                    2 * (ranks - 1) * bytes / ranks
                );
            }
        } else if accumulate > 1 {
            eprintln!(
                "accumulation: global batch {per_step} = {accumulate} micro-batches × {}",
                recipe.batch_size
            );
        }
        let log = if lead {
            std::fs::create_dir_all(&options.out)
                .with_context(|| format!("creating {}", options.out.display()))?;
            std::fs::write(
                options.out.join("config.json"),
                serde_json::to_string_pretty(&serde_json::json!({
                    "recipe": recipe, "network": config, "seed": seed, "data": options.data,
                    "checkpoint_every": options.checkpoint_every, "keep": options.keep,
                    "normalize": {"mean": normalize.mean, "std": normalize.std},
                    "ranks": ranks, "accumulate": accumulate,
                }))?,
            )?;
            Some(MetricsLog::open(
                &options.out,
                restored.as_ref().map(|r| r.state.iteration),
            )?)
        } else {
            None
        };
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
            world,
            accumulate,
            gradients,
            all_reduce_time: Duration::ZERO,
            wait_time: Duration::ZERO,
        })
    }

    fn lead(&self) -> bool {
        self.world.rank() == 0
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
        if self.lead() {
            eprintln!("recomputed BatchNorm statistics over {used} training batches");
        }
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
        if !self.lead() {
            return Ok(());
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
        let (rank, ranks) = (self.world.rank(), self.world.ranks());
        let (top1, top5) = if ranks == 1 {
            let report = evaluate(&self.model, test, &options)?;
            (report.accuracy.top1_error, report.accuracy.top5_error)
        } else {
            // Each rank evaluates every ranks-th image with rank 0's BN statistics (as DDP's
            // broadcast_buffers); the counts are summed.
            distributed::broadcast_state(self.world.as_ref(), &self.model)?;
            let shard: Vec<usize> = (rank..test.len()).step_by(ranks).collect();
            let a = evaluate(&self.model, test.subset(&shard), &options)?.accuracy;
            let images = a.images as f64;
            let mut counts = [
                images,
                (a.top1_error * images / 100.0).round(),
                (a.top5_error * images / 100.0).round(),
            ];
            self.world.sum_f64(&mut counts);
            let percent = |wrong: f64| 100.0 * wrong / counts[0].max(1.0);
            (percent(counts[1]), percent(counts[2]))
        };
        self.schedule.observe_eval(top1);
        let improved = self.state.best_test_error.is_none_or(|best| top1 < best);
        if improved {
            self.state.best_test_error = Some(top1);
        }
        if improved && self.lead() {
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

    /// One step on this rank's micro-batches of the global batch: their gradients, summed over micro-batches
    /// and ranks and averaged, then one SGD update. `None`: no rank had an image (all unreadable).
    fn step(&mut self, group: &[Batch], it: u64) -> Result<Option<StepOutcome>> {
        let device = self.options.device.clone();
        let options = StepOptions {
            label_smoothing: self.recipe.label_smoothing,
            recompute: self.options.recompute,
        };
        let (rank, ranks, k) = (self.world.rank() as u64, self.world.ranks(), group.len());
        if ranks == 1 && k == 1 {
            // One batch in one process: the step exactly as `resnet-infer bench --train` times it.
            let batch = &group[0];
            if batch.is_empty() {
                return Ok(None);
            }
            let (x, y) = batch.to_tensors(&device)?;
            // Dropout-shortcut masks are drawn for this iteration, whether run straight or resumed.
            self.model.set_training_step(it);
            let step = train_step(&self.model, &mut self.sgd, &x, &y, &options)?;
            let wrong = wrong_predictions(&step.logits, &batch.labels)?;
            return Ok(Some(StepOutcome {
                loss: step.loss as f64,
                error: 100.0 * wrong as f64 / batch.len() as f64,
                images: batch.len(),
                recomputed_segments: step.recomputed_segments,
                all_reduce: Duration::ZERO,
                waited: Duration::ZERO,
            }));
        }
        // Summed over ranks: losses of the micro-batches, misclassified images, images, micro-batches.
        let mut totals = [0f64; 4];
        let mut recomputed_segments = 0;
        for (j, batch) in group.iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let (x, y) = batch.to_tensors(&device)?;
            // Each micro-batch of the global batch draws its own dropout masks, the same whatever the world size.
            self.model
                .set_training_step((it * ranks as u64 + rank) * k as u64 + j as u64);
            let pass = batch_gradients(&self.model, &x, &y, &options)?;
            totals[0] += pass.loss as f64;
            totals[1] += wrong_predictions(&pass.logits, &batch.labels)? as f64;
            totals[2] += batch.len() as f64;
            totals[3] += 1.0;
            recomputed_segments = pass.recomputed_segments;
            if pass.loss.is_finite() {
                self.gradients.add(&pass.grads)?;
            }
        }
        // The first collective of the step: it also waits for the slowest rank.
        let started = Instant::now();
        self.world.sum_f64(&mut totals);
        let waited = started.elapsed();
        if totals[3] == 0.0 {
            return Ok(None);
        }
        let loss = totals[0] / totals[3];
        let mut all_reduce = Duration::ZERO;
        if loss.is_finite() {
            // A rank whose micro-batches were all unreadable still takes part, with zeros.
            let sum = match self.gradients.batches() {
                0 => candle_core::Tensor::zeros(self.gradients.len(), DType::F32, &device)?,
                _ => self.gradients.take()?,
            };
            let reducing = Instant::now();
            let sum = self.world.sum_tensor(&sum)?;
            all_reduce = reducing.elapsed();
            let grads = self.gradients.to_grad_store(&sum, 1.0 / totals[3])?;
            on_pool(&device, || self.sgd.step(&grads))?;
        } else if self.gradients.batches() > 0 {
            self.gradients.take()?;
        }
        Ok(Some(StepOutcome {
            loss,
            error: 100.0 * totals[1] / totals[2],
            images: totals[2] as usize,
            recomputed_segments,
            all_reduce,
            waited,
        }))
    }

    /// Every rank holds bit-identical parameters after a step, or training stops.
    fn check_replicas(&self, iteration: u64) -> Result<()> {
        let fingerprint = distributed::parameter_fingerprint(&self.model)?;
        distributed::check_agreement(
            self.world.as_ref(),
            &format!("its parameters after iteration {iteration}"),
            fingerprint,
            "the replicas diverged (they must stay bit-identical): training stopped",
        )
    }

    /// Trains until the recipe's iteration count; returns the final test error if there is a test split.
    pub fn run(&mut self) -> Result<Option<f64>> {
        let total = self.recipe.iterations;
        let start = self.state.iteration;
        let (mut loss_sum, mut err_sum, mut rows_n, mut images) = (0.0, 0.0, 0u64, 0usize);
        let mut since = Instant::now();
        let run_started = since;
        let mut final_error = None;
        // A progress bar on a terminal; plain log lines otherwise (and above the bar).
        let bar = (std::io::stderr().is_terminal() && self.lead()).then(|| {
            let style =
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            let bar = indicatif::ProgressBar::new(total).with_style(style);
            bar.set_position(self.state.iteration);
            bar
        });
        while self.state.iteration < total {
            let epoch = self.state.epoch;
            let k = self.accumulate;
            let mut batches = self.loader.epoch(epoch, self.state.batch_in_epoch * k);
            loop {
                // This rank's micro-batches of the step's global batch.
                let group: Vec<Batch> = batches.by_ref().take(k).collect::<Result<_, _>>()?;
                if group.len() < k {
                    break;
                }
                let it = self.state.iteration;
                let lr = self.schedule.lr(it);
                self.sgd.set_lr(lr);
                let Some(step) = self.step(&group, it)? else {
                    continue;
                };
                if step.recomputed_segments > 0 && it == start && self.lead() {
                    // Said by the step itself: the flag reached the training step.
                    eprintln!(
                        "memory: activations recomputed in backward, {} segments of {} residual units",
                        step.recomputed_segments,
                        self.model.net.unit_count()
                    );
                }
                let (loss_value, error) = (step.loss, step.error);
                if !loss_value.is_finite() {
                    bail!(
                        "the loss became {loss_value} at iteration {}: training stopped; {}",
                        it + 1,
                        self.last_good_checkpoint()
                    );
                }
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
                images += step.images;
                self.all_reduce_time += step.all_reduce;
                self.wait_time += step.waited;

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
                    if self.world.ranks() > 1 {
                        self.check_replicas(it)?;
                    }
                    if let Some(log) = &mut self.log {
                        log.append(&row)?;
                    }
                    if row.test_top1_error.is_some() && self.lead() {
                        self.draw_curves();
                    }
                    let per_step = self.recipe.batch_size * self.world.ranks() * k;
                    let eta = (total - it) as f64 * per_step as f64 / ips.max(1e-9);
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
                        None if self.lead() => eprintln!("{line}"),
                        None => {}
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
                || self.state.batch_in_epoch >= self.loader.steps_per_epoch()
            {
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if self.world.ranks() > 1 && self.lead() && self.state.iteration > start {
            let steps = (self.state.iteration - start) as f64;
            let per_step = |d: Duration| 1e3 * d.as_secs_f64() / steps;
            let whole = run_started.elapsed();
            eprintln!(
                "all-reduce: {:.1} ms per step on rank 0, {:.1} % of the run; waiting for the slowest rank {:.1} ms per step ({steps} steps; replicas bit-identical at every log step)",
                per_step(self.all_reduce_time),
                100.0 * self.all_reduce_time.as_secs_f64() / whole.as_secs_f64().max(1e-9),
                per_step(self.wait_time)
            );
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
